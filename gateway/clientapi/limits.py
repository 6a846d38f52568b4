"""The client API's bounds (docs/client-api.md, "Limits"): sizes, counts and waits."""

from __future__ import annotations

from typing import Final

MAX_BATCH_ENVELOPES: Final = 256  # envelopes in one POST /v1/envelopes/batch
MAX_WAIT_SECONDS: Final = 60  # longest long-poll a client may ask for
DEFAULT_WAIT_SECONDS: Final = 0
MAX_FETCH_LIMIT: Final = 500  # envelopes in one mailbox answer
DEFAULT_FETCH_LIMIT: Final = 100
MAX_ACK_IDS: Final = 500  # ids in one POST /v1/mailbox/ack
MAX_KEYS_BODY_BYTES: Final = 16 * 1024  # PUT /v1/keys body; real ones are ~150 bytes
MS_PER_SECOND: Final = 1000
