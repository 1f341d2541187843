"""Where a finished dump goes besides the local dump folder: object storage (S3)."""
