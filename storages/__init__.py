"""Storages: where originals and their derivatives are kept, behind one interface (storages/base.py), chosen by
STORAGE: 'disk' (storages/disk.py) or 's3' (storages/s3.py, any S3-compatible store)."""


def make_storage(config):
    """The storage STORAGE names (boto3 is imported only for S3)."""
    if config.STORAGE == 's3':
        from storages.s3 import S3Storage
        return S3Storage(config)
    from storages.disk import DiskStorage
    return DiskStorage(config)
