"""The click-ID codec: round trip, tampering, forgery, rotation, retired secrets."""

import base64
import random

import pytest

from pipeline.core import clickid

SECRETS = ["current-secret-1", "previous-secret-0"]
NOW = 1_795_637_791_064


def test_round_trip_reveals_time_and_is_url_safe():
    cid = clickid.issue(SECRETS, now_ms=NOW)
    assert len(cid) == clickid.ENCODED_LEN <= 48
    assert all(c.isalnum() or c in "-_" for c in cid)
    assert clickid.verify(cid, SECRETS, now_ms=NOW) == NOW
    assert clickid.issued_at_ms(cid) == NOW


def test_ids_are_unique():
    assert len({clickid.issue(SECRETS, now_ms=NOW) for _ in range(1000)}) == 1000


def test_tampered_time_is_rejected():
    raw = bytearray(base64.urlsafe_b64decode(clickid.issue(SECRETS, now_ms=NOW)))
    raw[5] ^= 1  # move the timestamp by a millisecond
    with pytest.raises(clickid.InvalidClickId, match="signature"):
        clickid.verify(base64.urlsafe_b64encode(bytes(raw)).decode(), SECRETS, now_ms=NOW)


@pytest.mark.parametrize("position", range(clickid.ENCODED_LEN))
def test_any_changed_character_is_rejected(position):
    cid = clickid.issue(SECRETS, now_ms=NOW)
    swapped = "A" if cid[position] != "A" else "B"
    forged = cid[:position] + swapped + cid[position + 1 :]
    with pytest.raises(clickid.InvalidClickId):
        clickid.verify(forged, SECRETS, now_ms=NOW)


def test_forgery_with_another_secret_is_rejected():
    forged = clickid.issue(["attacker-secret"], now_ms=NOW)
    with pytest.raises(clickid.InvalidClickId, match="signature"):
        clickid.verify(forged, SECRETS, now_ms=NOW)


def test_rotation_old_ids_still_verify_new_ones_use_first_secret():
    old = clickid.issue(["previous-secret-0"], now_ms=NOW)
    assert clickid.verify(old, SECRETS, now_ms=NOW) == NOW
    new = clickid.issue(SECRETS, now_ms=NOW)
    assert clickid.verify(new, ["current-secret-1"], now_ms=NOW) == NOW
    with pytest.raises(clickid.InvalidClickId):
        clickid.verify(new, ["previous-secret-0"], now_ms=NOW)


def test_retired_secret_no_longer_verifies():
    old = clickid.issue(["previous-secret-0"], now_ms=NOW)
    with pytest.raises(clickid.InvalidClickId):
        clickid.verify(old, ["current-secret-1"], now_ms=NOW)


def test_future_click_is_rejected():
    cid = clickid.issue(SECRETS, now_ms=NOW + 3_600_000)
    with pytest.raises(clickid.InvalidClickId, match="future"):
        clickid.verify(cid, SECRETS, now_ms=NOW)


@pytest.mark.parametrize("bad", ["", "short", "x" * 36, "!" * 36, "é" * 36, "A" * 48])
def test_garbage_is_rejected(bad):
    with pytest.raises(clickid.InvalidClickId):
        clickid.verify(bad, SECRETS, now_ms=NOW)


def test_mac_is_hmac_sha256_of_the_first_15_bytes():
    """The keyed-HMAC shortcut computes exactly HMAC-SHA256 (IDs issued before it still verify)."""
    import hashlib
    import hmac

    cid = clickid.issue(SECRETS, now_ms=NOW, nonce=bytes(range(9)))
    raw = base64.urlsafe_b64decode(cid)
    expected = hmac.new(SECRETS[0].encode(), raw[:15], hashlib.sha256).digest()[:12]
    assert raw[15:] == expected
    assert (
        cid
        == base64.urlsafe_b64encode(NOW.to_bytes(6, "big") + bytes(range(9)) + expected).decode()
    )
    assert clickid.verify(cid, list(reversed(SECRETS)), now_ms=NOW) == NOW


@pytest.mark.parametrize("length", [8, 20, 63, 64, 65, 200])
def test_mac_equals_hmac_new_for_every_key_length(length):
    """Keys up to SHA-256's block size are padded, longer ones hashed first (RFC 2104)."""
    import hashlib
    import hmac

    rng = random.Random(length)
    secret = "".join(rng.choice("abcdefgh0123456789é€") for _ in range(length))
    for size in (0, 1, 15, 64, 100):
        body = rng.randbytes(size)
        expected = hmac.new(secret.encode(), body, hashlib.sha256).digest()[:12]
        assert clickid._mac(secret, body) == expected
