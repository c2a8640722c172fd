"""Black-box client tests for the Web Asset Server.

Written only from shared/PROTOCOL.md: the server is started as a separate
process (``python server.py`` with settings in environment variables) and
spoken to over HTTP with the standard library, the way Specify 6, Specify 7
and the web portal speak to it.
"""

import email.utils
import hashlib
import hmac
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.processes import free_port, holds_listener, started

REPO = Path(__file__).resolve().parent.parent
CONVERT = "/usr/bin/convert"
IDENTIFY = "/usr/bin/identify"
KEY = "test-attachment-key"
COLL = "Fish"
TOLERANCE = 150
DATE_ORIGINAL = "2021:03:04 05:06:07"


# --------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------

def make_image(spec, fmt, size):
    """An image made by the real ImageMagick: spec like 'gradient:red-blue'."""
    out = subprocess.run(
        [CONVERT, "-size", size, spec, "-strip", f"{fmt}:-"],
        check=True, capture_output=True, timeout=30,
    )
    return out.stdout


def identify(data):
    """(format, width, height) of the first frame of an image."""
    out = subprocess.run(
        [IDENTIFY, "-format", "%m %w %h\n", "-"],
        input=data, capture_output=True, timeout=30,
    )
    assert out.returncode == 0, f"not an image: {out.stderr[:300]!r}"
    fmt, w, h = out.stdout.decode().splitlines()[0].split()
    return fmt, int(w), int(h)


def exif_app1(make="TestCam", date=DATE_ORIGINAL):
    """An APP1 Exif segment with Image Make and EXIF DateTimeOriginal."""
    make_b = make.encode() + b"\x00"
    date_b = date.encode() + b"\x00"
    ifd0_at = 8
    ifd0_len = 2 + 2 * 12 + 4
    make_at = ifd0_at + ifd0_len
    exif_at = make_at + len(make_b)
    exif_len = 2 + 12 + 4
    date_at = exif_at + exif_len
    tiff = b"II*\x00" + struct.pack("<I", ifd0_at)
    tiff += struct.pack("<H", 2)
    tiff += struct.pack("<HHII", 0x010F, 2, len(make_b), make_at)
    tiff += struct.pack("<HHII", 0x8769, 4, 1, exif_at)
    tiff += struct.pack("<I", 0)
    tiff += make_b
    tiff += struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x9003, 2, len(date_b), date_at)
    tiff += struct.pack("<I", 0)
    tiff += date_b
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload


def with_exif(jpeg):
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + exif_app1() + jpeg[2:]


@pytest.fixture(scope="module")
def images():
    return {
        "big_jpg": make_image("gradient:red-blue", "jpg", "400x300"),
        "big_png": make_image("gradient:green-yellow", "png", "300x200"),
        "tall_png": make_image("gradient:blue-white", "png", "100x300"),
        "big_gif": make_image("gradient:black-white", "gif", "320x240"),
        "small_jpg": make_image("gradient:white-black", "jpg", "50x40"),
        "small_png": make_image("gradient:white-black", "png", "50x40"),
        "tiny_jpg": make_image("xc:orange", "jpg", "17x13"),
        "wide_jpg": make_image("gradient:yellow-purple", "jpg", "500x100"),
        "exif_jpg": with_exif(make_image("gradient:red-green", "jpg", "64x48")),
    }


# --------------------------------------------------------------------------
# A tiny HTTP client
# --------------------------------------------------------------------------

class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        return self.headers.get(name)

    def __repr__(self):
        return f"<Resp {self.status} {self.body[:200]!r}>"


def qs(params):
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def multipart(parts):
    """parts: list of (field name, value) or (field name, (filename, bytes))."""
    boundary = "----bbclient" + hashlib.md5(str(time.time()).encode()).hexdigest()
    out = b""
    for name, value in parts:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += (f'Content-Disposition: form-data; name="{name}"; '
                    f'filename="{filename}"\r\n').encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n"
            out += data + b"\r\n"
        else:
            if isinstance(value, str):
                value = value.encode("utf-8")
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            out += value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, root, *, require_key=False, static=False,
                 collections=None, prepare=None):
        self.root = Path(root)
        self.base = self.root / "attachments"
        self.base.mkdir(parents=True, exist_ok=True)
        if prepare:
            prepare(self.base)
        self.offset = 0
        env = dict(os.environ)
        env.pop("ATTACHMENT_KEY", None)
        env.update({
            "HOST": "127.0.0.1",
            "BASE_DIR": str(self.base),
            "KEY": KEY,
            "SERVER_NAME": "127.0.0.1",
            "TIME_TOLERANCE": str(TOLERANCE),
            "REQUIRE_KEY_FOR_GET": "true" if require_key else "false",
            "ALLOW_STATIC_FILE_ACCESS": "true" if static else "false",
        })
        if collections is None:
            env.pop("COLLECTION_DIRS", None)
        else:
            env["COLLECTION_DIRS"] = json.dumps(collections)
        self.log = open(self.root / "server.log", "wb")

        def launch():
            self.port = free_port()
            env.update(PORT=str(self.port), SERVER_PORT=str(self.port))
            self.log.seek(0)
            self.log.truncate()
            self.proc = subprocess.Popen(
                [sys.executable, "server.py"], cwd=str(REPO), env=env,
                stdout=self.log, stderr=subprocess.STDOUT,
            )
            return self.proc, self.log_text
        try:
            started(launch, self._ready, 20)
        except RuntimeError:
            self.log.close()
            pytest.fail("server did not answer GET / with 200 within 20 s:\n" + self.log_text())

    def _ready(self, proc):
        """Our own process listens on the port and answers GET / with 200 (which also sets the offset)."""
        if not holds_listener(proc.pid, self.port):
            return False
        try:
            return self.request("GET", "/", timeout=2).status == 200
        except OSError:
            return False

    def log_text(self):
        try:
            return (self.root / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    # -- HTTP --------------------------------------------------------------
    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            resp = Resp(r.status, r.headers, data)
        finally:
            conn.close()
        ts = resp.header("X-Timestamp")
        if ts and ts.strip().lstrip("-").isdigit():
            self.offset = int(ts) - time.time()  # keep our clock in step
        return resp

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    # -- tokens ------------------------------------------------------------
    def now(self):
        return int(time.time() + self.offset)

    def token(self, name, ts=None, key=KEY):
        ts = self.now() if ts is None else ts
        digest = hmac.new(key.encode(), (str(ts) + name).encode("utf-8"),
                          hashlib.md5).hexdigest()
        return f"{digest}:{ts}"

    # -- endpoints ---------------------------------------------------------
    def get(self, endpoint, params, method="GET", headers=None):
        return self.request(method, f"/{endpoint}?{qs(params)}", headers=headers)

    def fileget(self, filename, coll=COLL, method="GET", headers=None, **extra):
        params = {"filename": filename, "coll": coll, "type": "O"}
        params.update(extra)
        return self.get("fileget", params, method=method, headers=headers)

    def thumb(self, filename, scale, coll=COLL, **extra):
        params = {"filename": filename, "coll": coll, "type": "T", "scale": str(scale)}
        params.update(extra)
        return self.get("fileget", params)

    def upload7(self, store, data, coll=COLL, type_="O", token=None,
                headers=None):
        """Specify 7: the file part first, named 'file'."""
        token = self.token(store) if token is None else token
        body, ctype = multipart([
            ("file", ("upload.bin", data)),
            ("store", store), ("type", type_), ("coll", coll), ("token", token),
        ])
        h = {"Content-Type": ctype}
        h.update(headers or {})
        return self.request("POST", "/fileupload", body=body, headers=h)

    def upload6(self, store, data, local_name, coll=COLL, type_="O", token=None):
        """Specify 6: fields first, the file part named after the local file."""
        token = self.token(store) if token is None else token
        body, ctype = multipart([
            ("store", store), ("type", type_), ("coll", coll), ("token", token),
            ("disp", "Ichthyology"), ("div", "Zoology"), ("inst", "Museum"),
            (local_name, (local_name, data)),
        ])
        return self.request("POST", "/fileupload", body=body,
                            headers={"Content-Type": ctype})

    def delete(self, filename, coll=COLL, token=None):
        token = self.token(filename) if token is None else token
        body = qs({"filename": filename, "coll": coll, "token": token,
                   "disp": "Ichthyology", "div": "Zoology", "inst": "Museum"})
        return self.request(
            "POST", "/filedelete", body=body.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})

    def metadata(self, filename, dt="json", coll=COLL, **extra):
        params = {"filename": filename, "coll": coll, "dt": dt}
        params.update(extra)
        return self.get("getmetadata", params)


def upload_ok(server, store, data, **kw):
    r = server.upload7(store, data, **kw)
    assert r.status == 200, r
    return r


def ok_body(r):
    return r.body.strip() == b"Ok."


def names_under(base):
    """Every file and folder under base, as a walk finds them: a scratch folder the server removes meanwhile (a
    conversion ending) is passed over, not an error."""
    return [Path(folder, name) for folder, folders, files in os.walk(base) for name in folders + files]


def thumbnail_files(base, root):
    """Files anywhere under base named like a thumbnail of <root>."""
    pat = re.compile(re.escape(root) + r"_\d+(\.[^.]*)?$")
    return [p for p in names_under(base) if p.is_file() and pat.match(p.name)]


def ts_header_ok(r):
    ts = r.header("X-Timestamp")
    return ts is not None and re.fullmatch(r"\d+", ts) is not None \
        and abs(int(ts) - time.time()) < 300


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def legacy_files(images):
    """An attachments folder in the upstream layout, made before start."""
    return {
        "original": images["big_jpg"],
        "thumb": images["tiny_jpg"],  # 17x13: nothing the server would make
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, legacy_files):
    def prepare(base):
        (base / "originals").mkdir()
        (base / "thumbnails").mkdir()
        original = base / "originals" / "legacyphoto.jpg"
        original.write_bytes(legacy_files["original"])
        (base / "thumbnails" / "legacyphoto_123.jpg").write_bytes(legacy_files["thumb"])
        hour_ago = time.time() - 3600          # the thumbnail was made after its original
        os.utime(original, (hour_ago, hour_ago))

    s = Server(tmp_path_factory.mktemp("main"), prepare=prepare)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyserver(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keyed"), require_key=True, static=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def collserver(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("colls"), static=True,
               collections={"Fish": "fishfolder", "Plants": "plantfolder"})
    yield s
    s.stop()


# --------------------------------------------------------------------------
# GET /
# --------------------------------------------------------------------------

def test_root_answers_200_with_text(server):
    r = server.request("GET", "/")
    assert r.status == 200
    assert r.body.strip(), "GET / should say the server works"


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------

ENDPOINTS = {"read": "/fileget", "write": "/fileupload", "delete": "/filedelete",
             "getmetadata": "/getmetadata", "testkey": "/testkey"}


def discovery(server):
    r = server.request("GET", "/web_asset_store.xml")
    assert r.status == 200, r
    root = ET.fromstring(r.body)
    urls = {u.get("type"): (u.text or "") for u in root.findall("url")}
    return r, root, urls


def test_discovery_lists_the_five_url_types_first_then_iiif_and_capabilities(server):
    r, root, urls = discovery(server)
    assert root.tag == "urls"
    assert [url.get("type") for url in root.findall("url")] == list(ENDPOINTS) + ["iiif", "capabilities"]


def test_discovery_urls_are_absolute_and_point_at_the_endpoints(server):
    _, _, urls = discovery(server)
    for kind, path in ENDPOINTS.items():
        parsed = urllib.parse.urlsplit(urls[kind].strip())
        assert parsed.scheme == "http", urls[kind]
        assert parsed.hostname == "127.0.0.1", urls[kind]
        assert parsed.port == server.port, urls[kind]
        assert parsed.path == path, urls[kind]


def test_discovery_url_text_has_no_whitespace(server):
    _, _, urls = discovery(server)
    for kind, text in urls.items():
        assert text == text.strip(), f"{kind}: {text!r}"
        assert not re.search(r"\s", text), f"{kind}: {text!r}"


def test_discovery_content_type_is_text_xml(server):
    r, _, _ = discovery(server)
    assert r.header("Content-Type").split(";")[0].strip() == "text/xml"


def test_discovery_endpoints_are_siblings_of_the_document(server):
    _, _, urls = discovery(server)
    doc = server.url("/web_asset_store.xml")
    prefix = doc[: -len("/web_asset_store.xml")]
    for kind, path in ENDPOINTS.items():
        assert urls[kind] == prefix + path
    # and the read URL really is the fileget endpoint
    r = server.request("GET", urllib.parse.urlsplit(urls["read"]).path + "?"
                       + qs({"filename": "legacyphoto.jpg", "coll": COLL, "type": "O"}))
    assert r.status == 200


def test_discovery_has_x_timestamp(server):
    r, _, _ = discovery(server)
    assert ts_header_ok(r), r.headers


# --------------------------------------------------------------------------
# Tokens / testkey
# --------------------------------------------------------------------------

def test_testkey_good_token_is_ok(server):
    r = server.get("testkey", {"random": "abc123", "token": server.token("abc123")})
    assert r.status == 200
    assert ok_body(r)


def test_testkey_token_within_tolerance_is_ok(server):
    ts = server.now() - 100
    r = server.get("testkey", {"random": "older", "token": server.token("older", ts)})
    assert r.status == 200


def test_testkey_negative_number_random(server):
    r = server.get("testkey", {"random": "-123456789",
                               "token": server.token("-123456789")})
    assert r.status == 200
    assert ok_body(r)


def test_testkey_wrong_key_is_403(server):
    r = server.get("testkey", {"random": "abc", "token": server.token("abc", key="wrong")})
    assert r.status == 403


def test_testkey_token_for_other_random_is_403(server):
    r = server.get("testkey", {"random": "abc", "token": server.token("abd")})
    assert r.status == 403


def test_testkey_expired_token_is_403(server):
    ts = server.now() - 1000
    r = server.get("testkey", {"random": "abc", "token": server.token("abc", ts)})
    assert r.status == 403


def test_testkey_future_token_is_403(server):
    ts = server.now() + 1000
    r = server.get("testkey", {"random": "abc", "token": server.token("abc", ts)})
    assert r.status == 403


def test_testkey_missing_token_is_403(server):
    r = server.get("testkey", {"random": "abc"})
    assert r.status == 403


@pytest.mark.parametrize("token", [
    "", "nocolon", ":", "deadbeef:", ":12345", "zz:notanumber", "a:b:c",
    "0123456789abcdef0123456789abcdef:1e9", "é:1", "x" * 5000,
    "0123456789abcdef0123456789abcdef:-1",
    "0123456789abcdef0123456789abcdef:99999999999999999999999999",
])
def test_testkey_malformed_token_is_403(server, token):
    r = server.get("testkey", {"random": "abc", "token": token})
    assert r.status == 403, r


# --------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------

def test_upload_specify7_style(server, images):
    store = "3f2504e0-4f89-41d3-9a0c-0305e82c3301.jpg"
    r = server.upload7(store, images["big_jpg"])
    assert r.status == 200, r
    assert ok_body(r)
    assert r.header("Content-Type").startswith("text/plain")
    assert server.fileget(store).body == images["big_jpg"]


def test_upload_specify7_style_without_extension(server, images):
    store = "9b2c1a7e-1111-4222-8333-944455556666"
    upload_ok(server, store, images["big_png"])
    r = server.fileget(store)
    assert r.status == 200
    assert r.body == images["big_png"]


def test_upload_specify6_style(server, images):
    store = "sp61234567890123.att.jpg"
    r = server.upload6(store, images["big_jpg"], "My Photo.jpg")
    assert r.status == 200, r
    assert ok_body(r)
    assert server.fileget(store).body == images["big_jpg"]


def test_upload_thumbnail_type_is_ignored_and_stores_nothing(server, images):
    store = "sp69999999999.att.jpg"
    r = server.upload6(store, images["small_jpg"], "thumb.jpg", type_="T")
    assert r.status == 200
    assert r.body.strip() == b"Ignoring thumbnail upload!"
    assert server.fileget(store).status == 404
    assert not [p for p in names_under(server.root) if p.name.startswith("sp69999999999")]


def test_upload_thumbnail_type_does_not_replace_original(server, images):
    store = "sp6888888.att.jpg"
    assert server.upload6(store, images["big_jpg"], "orig.jpg").status == 200
    r = server.upload6(store, images["small_jpg"], "orig.jpg", type_="T")
    assert r.status == 200
    assert server.fileget(store).body == images["big_jpg"]


def test_upload_bad_token_is_403_and_stores_nothing(server, images):
    store = "badtoken-upload.jpg"
    r = server.upload7(store, images["big_jpg"], token=server.token(store, key="nope"))
    assert r.status == 403
    assert server.fileget(store).status == 404


def test_reupload_replaces_bytes(server, images):
    store = "reupload-bytes.png"
    upload_ok(server, store, images["big_png"])
    assert server.fileget(store).body == images["big_png"]
    upload_ok(server, store, images["tall_png"])
    assert server.fileget(store).body == images["tall_png"]


def test_reupload_regenerates_thumbnail(server, images):
    store = "reupload-thumb.png"
    upload_ok(server, store, images["big_png"])            # 300x200
    first = server.thumb(store, 123)
    assert first.status == 200
    assert identify(first.body)[1:] == (123, 82)
    upload_ok(server, store, images["tall_png"])           # 100x300
    second = server.thumb(store, 123)
    assert second.status == 200
    fmt, w, h = identify(second.body)
    assert h == 123 and abs(w - 41) <= 1, (w, h)


def test_upload_options_preflight(server):
    r = server.request("OPTIONS", "/fileupload", headers={
        "Origin": "http://specify.example.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    })
    assert r.status == 200, r
    assert r.header("Access-Control-Allow-Origin") == "*"


def test_upload_success_has_cors_header(server, images):
    r = server.upload7("cors-ok.jpg", images["small_jpg"],
                       headers={"Origin": "http://specify.example.org"})
    assert r.status == 200
    assert r.header("Access-Control-Allow-Origin") == "*"


def test_upload_bad_token_has_cors_header(server, images):
    r = server.upload7("cors-bad.jpg", images["small_jpg"], token="garbage",
                       headers={"Origin": "http://specify.example.org"})
    assert r.status == 403
    assert r.header("Access-Control-Allow-Origin") == "*"


def test_upload_bad_store_name_has_cors_header(server, images):
    r = server.upload7("../cors-evil.jpg", images["small_jpg"],
                       headers={"Origin": "http://specify.example.org"})
    assert r.status == 400
    assert r.header("Access-Control-Allow-Origin") == "*"


# --------------------------------------------------------------------------
# fileget: originals
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored(server, images):
    """A few files uploaded once for the read tests."""
    files = {
        "photo.jpg": images["big_jpg"],
        "picture.png": images["big_png"],
        "anim.gif": images["big_gif"],
        "small.jpg": images["small_jpg"],
        "small.png": images["small_png"],
        "wide.jpg": images["wide_jpg"],
        "exif.jpg": images["exif_jpg"],
        "notes.txt": b"just some text\n" * 40,
    }
    for name, data in files.items():
        upload_ok(server, name, data)
    return files


def test_fileget_returns_identical_bytes(server, stored):
    r = server.fileget("photo.jpg")
    assert r.status == 200
    assert r.body == stored["photo.jpg"]


@pytest.mark.parametrize("name,ctype", [
    ("photo.jpg", "image/jpeg"), ("picture.png", "image/png"),
    ("anim.gif", "image/gif"), ("notes.txt", "text/plain"),
])
def test_fileget_content_type(server, stored, name, ctype):
    r = server.fileget(name)
    assert r.status == 200
    assert r.header("Content-Type").split(";")[0].strip() == ctype


def test_fileget_content_length(server, stored):
    r = server.fileget("photo.jpg")
    assert int(r.header("Content-Length")) == len(stored["photo.jpg"])


def test_fileget_last_modified(server, stored):
    r = server.fileget("photo.jpg")
    lm = r.header("Last-Modified")
    assert lm, r.headers
    when = email.utils.parsedate_to_datetime(lm).timestamp()
    assert abs(when - time.time()) < 3600


def test_fileget_head(server, stored):
    r = server.fileget("photo.jpg", method="HEAD")
    assert r.status == 200
    assert r.body == b""
    assert int(r.header("Content-Length")) == len(stored["photo.jpg"])


def test_fileget_range_is_206_with_the_right_bytes(server, stored):
    data = stored["photo.jpg"]
    r = server.fileget("photo.jpg", headers={"Range": "bytes=10-19"})
    assert r.status == 206
    assert r.body == data[10:20]
    assert r.header("Content-Range") == f"bytes 10-19/{len(data)}"


def test_fileget_if_modified_since_is_304(server, stored):
    lm = server.fileget("photo.jpg").header("Last-Modified")
    r = server.fileget("photo.jpg", headers={"If-Modified-Since": lm})
    assert r.status == 304
    assert r.body == b""


@pytest.mark.parametrize("downloadname", [
    "Fisch Ü 日本 ñ.jpg", 'odd "name"; with, 100% & stuff.jpg', "plain.jpg",
])
def test_fileget_downloadname_content_disposition(server, stored, downloadname):
    r = server.fileget("photo.jpg", downloadname=downloadname)
    assert r.status == 200
    assert r.body == stored["photo.jpg"]
    cd = r.header("Content-Disposition")
    assert cd is not None
    m = re.match(r"inline; filename\*=utf-8''([^;\s]*)", cd, re.IGNORECASE)
    assert m, cd
    assert cd.startswith("inline; filename*=")
    quoted = m.group(1)
    assert re.fullmatch(r"[A-Za-z0-9!#$&+\-.^_`|~%]*", quoted), quoted
    assert urllib.parse.unquote(quoted, encoding="utf-8", errors="strict") == downloadname


def test_fileget_scale_null_with_type_o_is_ignored(server, stored):
    r = server.fileget("photo.jpg", scale="null")
    assert r.status == 200
    assert r.body == stored["photo.jpg"]


def test_fileget_unknown_params_are_ignored(server, stored):
    r = server.fileget("photo.jpg", disp="Ichthyology", div="Zoology",
                       inst="Museum", dt="json", whatever="1")
    assert r.status == 200
    assert r.body == stored["photo.jpg"]


def test_fileget_html_escaped_query_string(server, stored):
    r = server.request("GET", "/fileget?filename=photo.jpg&amp;coll=Fish&amp;type=O")
    assert r.status == 200
    assert r.body == stored["photo.jpg"]


def test_fileget_html_escaped_query_string_thumbnail(server, stored):
    r = server.request(
        "GET", "/fileget?filename=photo.jpg&amp;coll=Fish&amp;type=T&amp;scale=123")
    assert r.status == 200
    assert identify(r.body)[1:] == (123, 92)


def test_fileget_missing_file_is_404(server):
    assert server.fileget("no-such-file.jpg").status == 404


def test_fileget_missing_thumbnail_original_is_404(server):
    assert server.thumb("no-such-file.jpg", 123).status == 404


# --------------------------------------------------------------------------
# fileget: thumbnails
# --------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [123, 256])
def test_thumbnail_longer_side_is_the_scale(server, stored, scale):
    r = server.thumb("photo.jpg", scale)  # 400x300
    assert r.status == 200
    fmt, w, h = identify(r.body)
    assert w == scale, (w, h)
    assert abs(h - round(300 * scale / 400)) <= 1, (w, h)


@pytest.mark.parametrize("scale", [123, 256])
def test_thumbnail_of_wide_image_bounds_longer_side(server, stored, scale):
    r = server.thumb("wide.jpg", scale)  # 500x100
    assert r.status == 200
    fmt, w, h = identify(r.body)
    assert max(w, h) == min(scale, 500)
    assert abs(h - round(100 * scale / 500)) <= 1


@pytest.mark.parametrize("name", ["small.jpg", "small.png"])
@pytest.mark.parametrize("scale", [123, 256])
def test_thumbnail_never_upscales(server, stored, scale, name):
    r = server.thumb(name, scale)  # 50x40
    assert r.status == 200
    assert identify(r.body)[1:] == (50, 40)


@pytest.mark.parametrize("name,fmt,ctype", [
    ("photo.jpg", "JPEG", "image/jpeg"), ("picture.png", "PNG", "image/png"),
    ("anim.gif", "GIF", "image/gif"),
])
def test_thumbnail_keeps_format(server, stored, name, fmt, ctype):
    r = server.thumb(name, 123)
    assert r.status == 200
    assert identify(r.body)[0] == fmt
    assert r.header("Content-Type").split(";")[0].strip() == ctype


def test_thumbnail_is_stable_between_requests(server, stored):
    a = server.thumb("picture.png", 200)
    b = server.thumb("picture.png", 200)
    assert a.status == b.status == 200
    assert a.body == b.body
    assert identify(a.body)[1:] == (200, 133) or identify(a.body)[1:] == (200, 134)


def test_thumbnail_of_text_file_is_404(server, stored):
    r = server.thumb("notes.txt", 123)
    assert r.status == 404


def test_thumbnail_cached_on_disk_in_upstream_layout(server, stored):
    assert server.thumb("photo.jpg", 500).status == 200
    assert (server.base / "thumbnails" / "photo_500.jpg").is_file()


# --------------------------------------------------------------------------
# Existing attachments folder (upstream layout)
# --------------------------------------------------------------------------

def test_existing_original_is_served(server, legacy_files):
    r = server.fileget("legacyphoto.jpg")
    assert r.status == 200
    assert r.body == legacy_files["original"]


def test_existing_cached_thumbnail_is_served_as_is(server, legacy_files):
    r = server.thumb("legacyphoto.jpg", 123)
    assert r.status == 200
    assert r.body == legacy_files["thumb"]


# --------------------------------------------------------------------------
# filedelete
# --------------------------------------------------------------------------

def test_filedelete_removes_the_file(server, images):
    upload_ok(server, "todelete.jpg", images["big_jpg"])
    r = server.delete("todelete.jpg")
    assert r.status == 200
    assert ok_body(r)
    assert server.fileget("todelete.jpg").status == 404
    assert not (server.base / "originals" / "todelete.jpg").exists()


def test_filedelete_removes_thumbnails(server, images):
    upload_ok(server, "delthumbs.jpg", images["big_jpg"])
    for scale in (123, 256):
        assert server.thumb("delthumbs.jpg", scale).status == 200
    assert thumbnail_files(server.base, "delthumbs"), "thumbnails not cached on disk"
    assert server.delete("delthumbs.jpg").status == 200
    assert thumbnail_files(server.base, "delthumbs") == []
    assert server.thumb("delthumbs.jpg", 123).status == 404


def test_filedelete_missing_file_is_404(server):
    assert server.delete("never-was-here.jpg").status == 404


def test_filedelete_bad_token_is_403_and_keeps_file(server, images):
    upload_ok(server, "keepme.jpg", images["small_jpg"])
    r = server.delete("keepme.jpg", token=server.token("keepme.jpg", key="bad"))
    assert r.status == 403
    assert server.fileget("keepme.jpg").body == images["small_jpg"]


def test_filedelete_keeps_other_files_thumbnails(server, images):
    upload_ok(server, "pair.jpg", images["big_jpg"])
    upload_ok(server, "pair_1.jpg", images["wide_jpg"])
    assert server.thumb("pair.jpg", 123).status == 200
    assert server.thumb("pair_1.jpg", 123).status == 200
    other = thumbnail_files(server.base, "pair_1")
    assert other, "thumbnail of pair_1.jpg not cached on disk"
    assert server.delete("pair.jpg").status == 200
    for p in other:
        assert p.exists(), f"{p} was removed with pair.jpg"
    assert server.fileget("pair_1.jpg").body == images["wide_jpg"]


# --------------------------------------------------------------------------
# getmetadata
# --------------------------------------------------------------------------

def test_getmetadata_json_array_of_groups(server, stored):
    r = server.metadata("exif.jpg", "json")
    assert r.status == 200
    data = json.loads(r.body)
    assert isinstance(data, list) and data
    for group in data:
        assert set(group) == {"Name", "Fields"}
        assert isinstance(group["Name"], str)
        assert isinstance(group["Fields"], dict)
        for k, v in group["Fields"].items():
            assert isinstance(k, str) and isinstance(v, str), (k, v)
    groups = {g["Name"]: g["Fields"] for g in data}
    assert groups["EXIF"]["DateTimeOriginal"] == DATE_ORIGINAL
    assert groups["Image"]["Make"] == "TestCam"


def test_getmetadata_json_without_exif_is_empty_array(server, stored):
    r = server.metadata("small.jpg", "json")
    assert r.status == 200
    assert json.loads(r.body) == []


def test_getmetadata_date(server, stored):
    r = server.metadata("exif.jpg", "date")
    assert r.status == 200
    assert r.body.decode().strip() == DATE_ORIGINAL


def test_getmetadata_date_without_exif_is_404(server, stored):
    assert server.metadata("small.jpg", "date").status == 404


def test_getmetadata_missing_file_is_404(server):
    assert server.metadata("no-such-file.jpg", "json").status == 404


# --------------------------------------------------------------------------
# Hostile names
# --------------------------------------------------------------------------

HOSTILE = ["../hx1.jpg", "../../hx2.jpg", "../../../hx3.jpg", "sub/hx4.jpg",
           "..", "hx5\x00.jpg", "/tmp/hx6.jpg", "originals/../../hx7.jpg"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_store_name_upload_is_400_and_creates_nothing(server, images, name):
    # Only the folders these names reach: the rest of the session's temp is other servers' (still working).
    beside = [server.base.parent, server.base.parent.parent]
    before = [set(folder.iterdir()) for folder in beside]
    tmp_existed = Path("/tmp/hx6.jpg").exists()
    r = server.upload7(name, images["small_jpg"])
    assert r.status == 400, r
    assert [set(folder.iterdir()) - was for folder, was in zip(beside, before)] == [set(), set()]
    assert [p for p in names_under(server.base) if p.name.startswith("hx")] == []
    assert Path("/tmp/hx6.jpg").exists() == tmp_existed


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_filename_fileget_is_400(server, name):
    r = server.fileget(name)
    assert r.status == 400, r


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_filename_thumbnail_is_400(server, name):
    r = server.thumb(name, 123)
    assert r.status == 400, r


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_filename_getmetadata_is_400(server, name):
    r = server.metadata(name, "json")
    assert r.status == 400, r


def test_hostile_filename_fileget_does_not_read_outside(server):
    outside = server.root / "outside-secret.jpg"
    outside.write_bytes(b"SECRET-BYTES")
    r = server.fileget("../../outside-secret.jpg")
    assert r.status == 400
    assert b"SECRET-BYTES" not in r.body


def test_hostile_filename_filedelete_is_400_and_keeps_outside_file(server):
    outside = server.root / "outside-keep.jpg"
    outside.write_bytes(b"KEEP")
    r = server.delete("../../outside-keep.jpg")
    assert r.status == 400
    assert outside.read_bytes() == b"KEEP"


def test_nul_percent_encoded_in_query_is_400(server, stored):
    r = server.request("GET", "/fileget?filename=photo.jpg%00.txt&coll=Fish&type=O")
    assert r.status == 400


def test_unicode_store_name_end_to_end(server, images):
    store = "Fisch-Ü-日本-ñ.jpg"
    r = server.upload7(store, images["big_jpg"])
    assert r.status == 200, r
    assert (server.base / "originals" / store).read_bytes() == images["big_jpg"]
    assert server.fileget(store).body == images["big_jpg"]
    t = server.thumb(store, 123)
    assert t.status == 200
    assert identify(t.body)[1:] == (123, 92)
    assert server.delete(store).status == 200
    assert server.fileget(store).status == 404


# --------------------------------------------------------------------------
# X-Timestamp on every response
# --------------------------------------------------------------------------

def _ts_cases():
    return {
        "root-200": (lambda s: s.request("GET", "/"), 200),
        "discovery-200": (lambda s: s.request("GET", "/web_asset_store.xml"), 200),
        "fileget-200": (lambda s: s.fileget("legacyphoto.jpg"), 200),
        "fileget-head-200": (lambda s: s.fileget("legacyphoto.jpg", method="HEAD"), 200),
        "fileget-206": (lambda s: s.fileget("legacyphoto.jpg",
                                            headers={"Range": "bytes=0-9"}), 206),
        "fileget-304": (lambda s: s.fileget("legacyphoto.jpg", headers={
            "If-Modified-Since": s.fileget("legacyphoto.jpg").header("Last-Modified")
            or "x"}), 304),
        "fileget-404": (lambda s: s.fileget("absent.jpg"), 404),
        "fileget-400": (lambda s: s.fileget("../absent.jpg"), 400),
        "thumb-404": (lambda s: s.thumb("absent.jpg", 123), 404),
        "testkey-200": (lambda s: s.get("testkey", {"random": "r", "token": s.token("r")}), 200),
        "testkey-403": (lambda s: s.get("testkey", {"random": "r", "token": "bad"}), 403),
        "upload-403": (lambda s: s.upload7("ts.jpg", b"x", token="bad"), 403),
        "upload-400": (lambda s: s.upload7("../ts.jpg", b"x"), 400),
        "options-200": (lambda s: s.request("OPTIONS", "/fileupload", headers={
            "Origin": "http://x", "Access-Control-Request-Method": "POST"}), 200),
        "delete-404": (lambda s: s.delete("absent.jpg"), 404),
        "delete-403": (lambda s: s.delete("absent.jpg", token="bad"), 403),
        "getmetadata-404": (lambda s: s.metadata("absent.jpg"), 404),
        "unknown-path-404": (lambda s: s.request("GET", "/no/such/endpoint"), 404),
    }


@pytest.mark.parametrize("case", list(_ts_cases()))
def test_x_timestamp_on_every_response(server, case):
    call, status = _ts_cases()[case]
    r = call(server)
    assert r.status == status, r
    assert ts_header_ok(r), (r.status, dict(r.headers))


# --------------------------------------------------------------------------
# REQUIRE_KEY_FOR_GET
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_file(keyserver, images):
    upload_ok(keyserver, "keyed.jpg", images["exif_jpg"])
    return images["exif_jpg"]


def test_required_key_fileget_without_token_is_403(keyserver, keyed_file):
    r = keyserver.fileget("keyed.jpg")
    assert r.status == 403
    assert ts_header_ok(r)
    assert keyed_file not in r.body


def test_required_key_fileget_with_bad_token_is_403(keyserver, keyed_file):
    r = keyserver.fileget("keyed.jpg", token=keyserver.token("keyed.jpg", key="bad"))
    assert r.status == 403


def test_required_key_fileget_with_token_is_200(keyserver, keyed_file):
    r = keyserver.fileget("keyed.jpg", token=keyserver.token("keyed.jpg"))
    assert r.status == 200
    assert r.body == keyed_file


def test_required_key_thumbnail_without_token_is_403(keyserver, keyed_file):
    r = keyserver.thumb("keyed.jpg", 123)
    assert r.status == 403


def test_required_key_getmetadata_without_token_is_403(keyserver, keyed_file):
    r = keyserver.metadata("keyed.jpg", "json")
    assert r.status == 403
    assert ts_header_ok(r)


def test_required_key_getmetadata_with_token_is_200(keyserver, keyed_file):
    r = keyserver.metadata("keyed.jpg", "date", token=keyserver.token("keyed.jpg"))
    assert r.status == 200
    assert r.body.decode().strip() == DATE_ORIGINAL


def test_required_key_static_serves_nothing_without_token(keyserver, keyed_file):
    r = keyserver.request("GET", "/static/originals/keyed.jpg")
    assert r.status == 403
    assert keyed_file not in r.body


# --------------------------------------------------------------------------
# Static access switch
# --------------------------------------------------------------------------

def test_static_off_serves_nothing(server, legacy_files):
    r = server.request("GET", "/static/originals/legacyphoto.jpg")
    assert r.status == 404, r  # the endpoint does not exist
    assert legacy_files["original"] not in r.body


def test_static_on_serves_the_file(collserver, images):
    upload_ok(collserver, "static.jpg", images["small_jpg"], coll="Fish")
    r = collserver.request("GET", "/static/fishfolder/originals/static.jpg")
    assert r.status == 200
    assert r.body == images["small_jpg"]


def test_getfileref_gives_static_url(collserver, images):
    upload_ok(collserver, "fileref.jpg", images["small_jpg"], coll="Fish")
    r = collserver.get("getfileref", {"filename": "fileref.jpg", "coll": "Fish",
                                      "type": "O"})
    assert r.status == 200
    assert r.header("Access-Control-Allow-Origin") == "*"
    url = r.body.decode().strip()
    path = urllib.parse.urlsplit(url).path
    assert path.startswith("/static/"), url
    got = collserver.request("GET", path)
    assert got.status == 200
    assert got.body == images["small_jpg"]


# --------------------------------------------------------------------------
# Collections
# --------------------------------------------------------------------------

def test_collection_upload_lands_in_collection_folder(collserver, images):
    upload_ok(collserver, "collfile.jpg", images["big_jpg"], coll="Fish")
    on_disk = collserver.base / "fishfolder" / "originals" / "collfile.jpg"
    assert on_disk.read_bytes() == images["big_jpg"]
    assert not (collserver.base / "originals" / "collfile.jpg").exists()
    assert not (collserver.base / "plantfolder" / "originals" / "collfile.jpg").exists()


def test_collection_fileget_reads_from_collection_folder(collserver, images):
    upload_ok(collserver, "collread.jpg", images["big_jpg"], coll="Plants")
    r = collserver.fileget("collread.jpg", coll="Plants")
    assert r.status == 200
    assert r.body == images["big_jpg"]
    assert collserver.fileget("collread.jpg", coll="Fish").status == 404


def test_collection_thumbnail_cached_in_collection_folder(collserver, images):
    upload_ok(collserver, "collthumb.jpg", images["big_jpg"], coll="Fish")
    r = collserver.thumb("collthumb.jpg", 123, coll="Fish")
    assert r.status == 200
    assert (collserver.base / "fishfolder" / "thumbnails" / "collthumb_123.jpg").is_file()


def test_collection_unknown_is_404(collserver, images):
    upload_ok(collserver, "collknown.jpg", images["small_jpg"], coll="Fish")
    r = collserver.fileget("collknown.jpg", coll="Birds")
    assert r.status == 404
    assert ts_header_ok(r)
