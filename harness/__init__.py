"""The test harness, shared by tests/ and bench/: what they start and speak to, each in a module of its own.

client (the app in-process, spoken to as Specify does), images (test images), processes (ports, process trees),
servers (`python server.py` as a process), nginx, seaweed (SeaweedFS as the S3 store), browser (Chromium),
podman (the Docker image, built and run without a Docker engine). Imports the server's modules; nothing of the
server imports it.
"""
