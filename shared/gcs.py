"""A GCS object pinned to one generation: metadata and ranged reads, never the whole file in memory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc

from shared.clients import storage_client
from shared.exceptions import BadRequestError, SourceObjectNotFoundError


# Bucket naming rules: 3-222 characters of a-z 0-9 - _ . with a letter or digit at both ends.
_BUCKET = r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
_BUCKET_RE = re.compile(f"^{_BUCKET}$")
MAX_OBJECT_NAME_BYTES = 1024
# The shape `parse_gcs_path` accepts, for request schemas; it refuses '.', '..' and a trailing '/' too.
GCS_PATH_PATTERN = f"^gs://{_BUCKET}/[^\\r\\n]+$"


def parse_gcs_path(path: str) -> tuple[str, str]:
    """(bucket, object) of `gs://bucket/object`: the one rule every request, event and command is held to."""
    if not isinstance(path, str) or not path.startswith("gs://"):
        raise BadRequestError(f"gcs_path must look like gs://bucket/object, got {str(path)[:200]!r}",
                              code="bad_gcs_path")
    rest = path[len("gs://"):]
    bucket, _, name = rest.partition("/")
    if not _BUCKET_RE.match(bucket or ""):
        raise BadRequestError(f"{bucket[:230]!r} is not a valid bucket name (3-222 chars: a-z 0-9 - _ .)",
                              code="bad_gcs_path")
    # GCS never names an object "." or ".." (nor with CR/LF); asked for ".", the JSON API answers
    # with the *bucket's* metadata, so such a path must be refused before any request.
    if name in (".", "..") or "\r" in name or "\n" in name:
        raise BadRequestError(f"{name[:200]!r} is not a valid GCS object name (objects cannot be named '.' or '..' "
                              f"or contain CR/LF); got {path[:200]!r}", code="bad_gcs_path")
    if not bucket or not name or name.endswith("/"):
        raise BadRequestError(f"gcs_path must name an object: gs://bucket/object, got {path[:200]!r}",
                              code="bad_gcs_path")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_OBJECT_NAME_BYTES:
        raise BadRequestError(f"object names are at most {MAX_OBJECT_NAME_BYTES} bytes of UTF-8; got "
                              f"{path[:100]!r}…", code="bad_gcs_path")
    return bucket, name


@dataclass
class GcsObject:
    """One generation of an object; reads fail loudly if that generation is gone."""

    bucket: str
    name: str
    generation: int
    size: int
    content_type: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def gcs_path(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @classmethod
    def stat(cls, bucket: str, name: str, generation: int | str | None = None) -> "GcsObject":
        """Metadata of the given (or the live) generation; 404-style error naming the path if absent."""
        path = f"gs://{bucket}/{name}" + (f"#{generation}" if generation else "")
        try:
            blob = storage_client().bucket(bucket).get_blob(name, generation=int(generation) if generation else None)
        except gexc.NotFound:
            blob = None
        if blob is None:
            raise SourceObjectNotFoundError(f"{path} does not exist (or is not readable by upcfan)",
                                            details={"gcs_path": path})
        return cls(bucket=bucket, name=name, generation=int(blob.generation), size=int(blob.size or 0),
                   content_type=blob.content_type or "", metadata=dict(blob.metadata or {}))

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of this generation (a ranged, generation-pinned download)."""
        if end <= start:
            return b""
        blob = storage_client().bucket(self.bucket).blob(self.name, generation=self.generation)
        try:
            return blob.download_as_bytes(start=start, end=end - 1, checksum=None)
        except gexc.NotFound:
            raise SourceObjectNotFoundError(
                f"{self.gcs_path} generation {self.generation} was deleted or replaced while it was being read",
                code="object_generation_gone", details={"gcs_path": self.gcs_path, "generation": self.generation},
            ) from None
