"""MariaDB (Debian's mariadb-server) as the Specify database of tests: a server of its own on a free loopback
port, its data in a temporary folder, a `specify` database whose `attachment` table is made as Specify 7's
migration 0001 makes it, and a user that may only read it; stopped by its own pid."""

import os
import shutil
import subprocess

from harness.processes import free_port, holds_listener, started, stop_process

ATTACHMENT_TABLE = """CREATE TABLE attachment (
    AttachmentID int NOT NULL AUTO_INCREMENT PRIMARY KEY,
    TimestampCreated datetime NOT NULL DEFAULT CURRENT_TIMESTAMP,
    TimestampModified datetime NULL,
    Version int NULL DEFAULT 0,
    AttachmentLocation varchar(128) NULL,
    AttachmentStorageConfig longtext NULL,
    CaptureDevice varchar(128) NULL,
    CopyrightDate varchar(64) NULL,
    CopyrightHolder varchar(64) NULL,
    Credit varchar(64) NULL,
    DateImaged varchar(64) NULL,
    FileCreatedDate date NULL,
    GUID varchar(128) NULL,
    IsPublic bit(1) NOT NULL DEFAULT 1,
    License varchar(64) NULL,
    LicenseLogoUrl varchar(256) NULL,
    MetadataText varchar(256) NULL,
    MimeType varchar(1024) NULL,
    OrigFilename longtext NULL,
    Remarks longtext NULL,
    ScopeID int NULL,
    ScopeType tinyint NULL,
    SubjectOrientation varchar(64) NULL,
    Subtype varchar(64) NULL,
    TableID smallint NULL,
    Title varchar(255) NULL,
    Type varchar(64) NULL,
    Visibility tinyint NULL,
    INDEX AttchmentLocIDX (AttachmentLocation)
) DEFAULT CHARSET=utf8mb4"""


def program(*names):
    for name in names:
        for folder in ('/usr/sbin', '/usr/bin'):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return shutil.which(names[0])


class MariaDB:
    """A MariaDB server for the tests, with the reader's URL in `url` (mysql://reader:…@127.0.0.1:PORT/specify)."""

    def __init__(self, folder):
        self.folder, self.data, self.socket = folder, os.path.join(folder, 'data'), os.path.join(folder, 'mysqld.sock')
        subprocess.run([program('mariadb-install-db', 'mysql_install_db'), '--no-defaults', f'--datadir={self.data}',
                        '--user=root', '--auth-root-authentication-method=socket', '--skip-test-db'],
                       check=True, capture_output=True, timeout=120)

        def launch():
            self.port = free_port()
            log = open(os.path.join(folder, 'mariadb.log'), 'ab')
            process = subprocess.Popen([program('mariadbd', 'mysqld'), '--no-defaults', f'--datadir={self.data}',
                                        '--user=root', '--bind-address=127.0.0.1', f'--port={self.port}',
                                        f'--socket={self.socket}', f'--pid-file={folder}/mariadb.pid',
                                        '--skip-log-bin', '--innodb-buffer-pool-size=16M'],
                                       stdout=log, stderr=subprocess.STDOUT)

            def output():
                with open(os.path.join(folder, 'mariadb.log'), 'rb') as f:
                    return f.read().decode('utf-8', 'replace')
            return process, output
        self.process = started(launch, lambda process: holds_listener(process.pid, self.port), 60)
        self.sql('CREATE DATABASE specify CHARACTER SET utf8mb4', ATTACHMENT_TABLE.replace(
            'CREATE TABLE attachment', 'CREATE TABLE specify.attachment'),
            "CREATE USER reader@'127.0.0.1' IDENTIFIED BY 'p@ss:word/1'",
            "GRANT SELECT ON specify.* TO reader@'127.0.0.1'")
        self.url = f'mysql://reader:p%40ss%3Aword%2F1@127.0.0.1:{self.port}/specify'

    def sql(self, *statements):
        """Run statements as root over the socket."""
        subprocess.run([program('mariadb', 'mysql'), '--no-defaults', f'--socket={self.socket}', '-uroot'],
                       input=';\n'.join(statements) + ';\n', text=True, check=True, capture_output=True, timeout=60)

    def attachments(self, *locations):
        """Replace the attachment table's rows with one per location (None: a row without a file)."""
        values = ', '.join('(NULL)' if location is None else "('" + location.replace("'", "''") + "')"
                           for location in locations)
        self.sql('DELETE FROM specify.attachment',
                 *([f'INSERT INTO specify.attachment (AttachmentLocation) VALUES {values}'] if locations else []))

    def stop(self):
        stop_process(self.process, patience=30)
