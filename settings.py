"""Settings of the Web Asset Server.

Every name below can also be set by an environment variable of the same name
(ints as digits, booleans as true/false, COLLECTION_DIRS and CAN_THUMBNAIL as
JSON, `none` for an empty optional value). Existing Docker deployments' names are
read too: ATTACHMENT_KEY sets KEY and DEBUG_MODE sets DEBUG.
"""

# --- Keys and tokens --------------------------------------------------------

KEY = None                       # Shared attachment key (Specify's attachment.key / ASSET_SERVER_KEY). None: use KEY_FILE, made with a random key on first start.
KEY_FILE = None                  # Where a generated key is kept; None means BASE_DIR/.web-asset-server.key.
AUTH_DISABLED = False            # True turns every token check off (anyone may write and delete); the server warns at every start.
TIME_TOLERANCE = 150             # Seconds a token stays valid either side of the server's clock; None turns the window off (then NO_TIME_WINDOW_ACKNOWLEDGED too).
NO_TIME_WINDOW_ACKNOWLEDGED = False  # True lets TIME_TOLERANCE None start: every token ever made, read or leaked then stays valid for good (docs/internals.md, The key).
REQUIRE_KEY_FOR_GET = False      # True: fileget, getmetadata and /static also need a token (Specify 7: WEB_ATTACHMENT_REQUIRES_KEY_FOR_GET).

# --- Listening and the discovery document ----------------------------------

HOST = '127.0.0.1'               # Address to listen on; 0.0.0.0 to accept other machines (the Docker image does).
PORT = 8080                      # Port to listen on.
SERVER_NAME = 'localhost'        # Public host name written into web_asset_store.xml.
SERVER_PORT = None               # Public port written into web_asset_store.xml; None means PORT. Left out of URLs when it is the scheme's default.
PUBLIC_SCHEME = 'http'           # Public scheme written into web_asset_store.xml: 'https' behind a TLS proxy.
TRUST_PROXY_HEADERS = False      # True: take scheme, host and port from X-Forwarded-Proto/-Host/-Port (only behind a proxy that sets them); every peer then also counts as a trusted proxy for client addresses.
TRUSTED_PROXIES = ['127.0.0.0/8', '::1/128', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7']  # Peers (networks) believed when the last X-Forwarded-For entry (else X-Real-IP) names the client, so per-client bounds follow real clients through Specify 7's nginx; [] (or none) trusts no peer. A lying peer gains at most the totals below, never a token or a file (docs/deployment.md, Inside Specify 7's composition).
SERVER = 'paste'                 # Bottle server adapter that runs the app; Paste is the one tested and recommended.
DEBUG = False                    # More logging; never shows tracebacks to clients.
FILE_OFFLOAD = None              # 'nginx': fileget answers with X-Accel-Redirect and nginx sends the file; 'apache': X-Sendfile. Disk storage only.
OFFLOAD_PREFIX = '/protected-attachments/'  # nginx internal location that maps to BASE_DIR (see deploy/nginx.conf).
ACCESS_LOG = True                # One line per request on standard error.
THREADS = 20                     # Requests Paste serves at once (an answer's sending holds none once the client does not take it at once); at least 5.
SOCKET_TIMEOUT = 60              # Seconds a connection may stay silent while a request body is read or an answer sent before it is dropped.
REQUEST_HEAD_TIMEOUT = 20        # Seconds a client has for a request's line and headers (from connecting, or from its previous answer); trickling does not extend it. Heads are read without holding a thread. Then 408.
REQUEST_BODY_GRACE = 20          # Seconds a request body may take before REQUEST_BODY_MIN_RATE counts.
REQUEST_BODY_MIN_RATE = 4096     # Bytes a second a request body must average after the grace (32 kbit/s; a 1 Mbit/s upload sends 30 times as much); slower is cut off with 408.
ANSWER_GRACE = 20                # Seconds an answer may take to send before ANSWER_MIN_RATE counts. What a client does not take at once is sent by one thread for all such answers, so a slow reader holds no worker thread.
ANSWER_MIN_RATE = 4096           # Bytes a second an answer must average after the grace (32 kbit/s; a 1 Mbit/s download takes 30 times as much); a slower reader is dropped.
MAX_CONNECTIONS = 500            # Open connections at once, idle ones included; more are answered 503 at once.
MAX_CONNECTIONS_PER_CLIENT = 50  # Open connections from one client; more are answered 503. A trusted proxy's connections count against the client each last carried a request for.
MAX_REQUESTS_PER_CLIENT = 10     # Requests one client may have in progress or waiting at once (a browser makes 6); more are answered 503. Behind a trusted proxy the client is the one it names.

# --- Storage ------------------------------------------------------------------

BASE_DIR = 'attachments'         # The attachments folder; relative paths are taken from this file's folder.
ORIG_DIR = 'originals'           # Folder of originals inside BASE_DIR (or inside each collection's folder).
THUMB_DIR = 'thumbnails'         # Folder of cached thumbnails (<root>_<scale><ext>), IIIF pyramids (<root>_iiif<ext>) and IIIF tiles (<root>_iiif,x,y,w,h,W,H<ext>).
COLLECTION_DIRS = None           # None: one folder for all collections. A dict {collection name: folder} puts each collection in BASE_DIR/<folder>; unknown collections are refused.
ALLOW_STATIC_FILE_ACCESS = True  # Serve /static/<path> and /getfileref for the web portal.
MAX_UPLOAD_SIZE = 2 * 1024 ** 3  # Largest upload accepted, in bytes (2 GiB).

# --- Preservation ---------------------------------------------------------------

TRASH_DAYS = 30                  # Days a deleted original stays in the trash, restorable (docs/preservation.md), before it is purged in the background; 0 deletes at once.
AUDIT_LOG = 'audit.jsonl'        # The audit log: one JSON line per change to an original (upload, replace, delete, …), appended and synced before the change is answered (docs/preservation.md); a relative path is taken from BASE_DIR.

# --- Object storage (S3) ---------------------------------------------------------

STORAGE = 'disk'                 # 'disk': attachments in BASE_DIR. 's3': in an S3-compatible store; BASE_DIR then keeps only uploads in progress and the key file.
S3_ENDPOINT_URL = None           # The store's URL, e.g. http://127.0.0.1:8333 (SeaweedFS) or http://minio:9000; None means AWS S3.
S3_BUCKET = None                 # Bucket that holds the attachments; it must exist.
S3_PREFIX = ''                   # Key prefix in the bucket, e.g. 'specify'; below it keys mirror the folders on disk.
S3_REGION = None                 # Region name; None takes it from the AWS configuration.
S3_ADDRESSING_STYLE = 'auto'     # 'path' for MinIO, SeaweedFS and Ceph without wildcard DNS; 'virtual' or 'auto' for AWS.
S3_ACCESS_KEY_ID = None          # Credentials; None uses the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles).
S3_SECRET_ACCESS_KEY = None      # Secret belonging to S3_ACCESS_KEY_ID.
S3_CONNECT_TIMEOUT = 3           # Seconds to connect before the store counts as unavailable (503).
S3_READ_TIMEOUT = 5              # Seconds to wait for the store's answer before it counts as unavailable.

# --- Thumbnails -----------------------------------------------------------------

CAN_THUMBNAIL = ['image/jpeg', 'image/png', 'image/gif', 'image/tiff',
                 'application/pdf', 'image/heic', 'image/heif']  # Kinds (told from the file's bytes) that get thumbnails.
MAX_THUMBNAIL_SCALE = 2000       # Largest `scale` a client may ask for, in pixels.
IMAGEMAGICK = None               # Path or name of ImageMagick's program; None finds `magick` (7) or `convert` (6) and checks it really is ImageMagick.
GHOSTSCRIPT = 'gs'               # Ghostscript, which renders PDF thumbnails (ImageMagick's policy usually forbids PDF).
THUMBNAIL_WORKERS = None         # Conversions run at once; None means the number of CPUs. The rest wait their turn.
THUMBNAIL_QUEUE = 16             # Thumbnail and IIIF requests that may hold a thread waiting for a conversion beyond those running. At most THREADS - 5 (at least 1) hold threads so; more wait without a thread, taken in turn client by client, up to THUMBNAIL_QUEUE_WAIT, then 503 with Retry-After.
THUMBNAIL_QUEUE_WAIT = 20        # Seconds a thumbnail request may wait for a thread (see THUMBNAIL_QUEUE), then for a conversion slot, and again for another request's (or the background's) conversion of the same thumbnail, before it is answered 503 with Retry-After. Also what a request with a body (an upload) may wait for a thread: with conversions, such requests hold at most THREADS - 5 threads, one client at most half.
THUMBNAIL_TIMEOUT = 60           # Seconds one conversion may take before it is killed.
THUMBNAIL_MAX_PIXELS = 250_000_000  # Images with more pixels than this are refused (decompression bombs).
THUMBNAIL_MEMORY_LIMIT = 256 * 1024 ** 2  # Memory one conversion's pixels may take, in bytes: ImageMagick's memory and memory-mapped pixel cache together, so a conversion stays within it plus ImageMagick's own (tens of MiB). Beyond it the pixels go to a disk cache in the scratch folder (slower, bounded by THUMBNAIL_DISK_LIMIT); images whose decoder would hold more at once are refused.
THUMBNAIL_DISK_LIMIT = 2 * 1024 ** 3    # Largest file one conversion may write (ImageMagick's disk cache included), in bytes.
THUMBNAIL_ADDRESS_SPACE_LIMIT = 1024 ** 3  # Address space (RLIMIT_AS) of each ImageMagick or Ghostscript process, in bytes (1 GiB; the largest real thumbnail measured needs 456 MiB).
THUMBNAIL_FAILURES_REMEMBERED = 10_000   # Failed conversions remembered (per original's bytes and scale), so a failing file costs one conversion, not one per request.
PREGENERATE_SCALE = 123          # Scale, or list of scales (e.g. [1000, 123]; in the environment 1000,123), made in the background right after an upload so the first view is instant: the largest first, each smaller one from it. None turns it off.
THUMBNAIL_OTHER_SCALES = 3        # Thumbnails of scales not in PREGENERATE_SCALE kept per original (the most recently made); any valid scale is still answered exactly, an older one of these is removed to make room. At least 1 (the one just made is being sent).
THUMBNAIL_OTHER_SCALES_ORIGINALS = 10_000  # Originals whose other-scale thumbnails this server follows; beyond, the least recently added to loses them. So they number at most this times THUMBNAIL_OTHER_SCALES.
THUMBNAIL_CACHE_MAX_BYTES = '100%'  # Total bytes of cached thumbnails, IIIF pyramids and tiles: a number, or a share of the bytes the originals hold ('100%': as many; counted at each sweep), so no client's viewing grows the cache to a multiple of the collection. Over it, a sweep in the background (at most one a minute) removes the least recently made (never one made in the last minute), those of other scales and IIIF first, down to 90%; `derivatives.py prune` does the same at once. None: no bound beyond THUMBNAIL_OTHER_SCALES.
WEBP_THUMBNAILS = True            # A thumbnail request whose Accept header names image/webp (browsers', not Specify 6's) is answered with a WebP thumbnail (GIF stays GIF), cached beside the other; until that is made (in the background), with the plain one if it is cached. Every thumbnail answer says Vary: Accept.

# --- IIIF (deep zoom) -------------------------------------------------------------

IIIF_MAX_SIZE = 4096             # Largest width and height of an IIIF image answer (info.json's maxWidth/maxHeight); larger requests are refused, `max` is fitted within it.
IIIF_GRANT_SECONDS = 3600        # With REQUIRE_KEY_FOR_GET: how long a viewer let in by one token may go on zooming into that one image (the grant in its URLs; docs/internals.md, "The key").

# --- Metadata (getmetadata) -----------------------------------------------------

METADATA_WORKERS = 2             # EXIF extractions run at once, each in a child process of its own; as many more requests may wait for one, the rest get 503 at once.
METADATA_WAIT = 2                # Seconds a request waits for a free extraction before it is answered 503 with Retry-After.
METADATA_TIMEOUT = 5             # Seconds one extraction may take (time the server spends reading the file from storage not counted) before its child is killed and the answer is 422.
METADATA_MEMORY_LIMIT = 256 * 1024 ** 2  # Address space of one extraction's child, in bytes; a file whose metadata needs more answers 422.
METADATA_MAX_READ = 16 * 1024 ** 2  # Bytes of a file one extraction may read; EXIF takes a few KB (a TIFF's may sit at its end, reached by seeking). More: 422.
METADATA_MAX_VALUE = 4096        # Longest value shown, in characters; a longer one is cut and ends with '…'.
METADATA_MAX_ANSWER = 1024 ** 2  # Largest getmetadata JSON answer, in bytes; a file whose metadata (values cut) is larger answers 422.
