"""Test support shipped with the package: fault injection and a local S3 server."""
