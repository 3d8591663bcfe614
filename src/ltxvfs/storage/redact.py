"""Keeping our secrets out of other libraries' log records (botocore, urllib3, s3transfer)."""

from __future__ import annotations

import logging
import threading


class RedactSecrets(logging.Filter):
    """Masks our secrets in the records of botocore's and urllib3's own loggers.

    At DEBUG, botocore logs every request's parameters and headers — the SSE-C key among them.
    We never turn those loggers on, but an application may; this filter (attached to each of
    those loggers, so it sees their records whatever the handlers) keeps our secrets out.
    It only runs for records that are actually emitted: nothing on the normal path.
    """

    LOGGERS = ("botocore", "botocore.endpoint", "botocore.hooks", "botocore.auth",
               "botocore.parsers", "botocore.retryhandler", "botocore.httpsession",
               "botocore.regions", "botocore.client", "botocore.credentials", "boto3",
               "urllib3", "urllib3.connectionpool", "s3transfer")

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._installed = False
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            self._secrets.update(x for x in secrets if x and len(x) >= 4)
            if not self._installed:
                for name in self.LOGGERS:
                    logging.getLogger(name).addFilter(self)
                self._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        masked = text
        for secret in self._secrets:
            if secret in masked:
                masked = masked.replace(secret, "***")
        if masked is not text and masked != text:
            record.msg, record.args = masked, ()
        return True



#: The process-wide filter; S3 clients add their secrets to it when they are created.
SECRETS = RedactSecrets()
