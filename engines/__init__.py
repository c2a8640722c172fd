"""Engines: what turns an original into a derivative, each bounded and run apart from the server's threads.

scheduling (slots, admission, remembered failures, the background backlog) -> imagemagick (thumbnails with
ImageMagick and Ghostscript) -> children (one pool of kept child processes, speaking framing.py's messages) ->
vips (pyramids and IIIF answers, run by pyramids.py in children) and metadata (EXIF, read by exif_child.py in
children).
"""
