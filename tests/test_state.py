"""A simulated device's two-slot state: newest intact slot wins, a cut-off write falls back, damage is refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedrec.shared.state import DeviceState, FileStateStore, SlotStateStore, StateError


def state(rounds: int) -> DeviceState:
    """A state after `rounds` charged rounds (a longer history, so a later state is a longer file)."""
    return DeviceState(device_id="sim-7", user_row=np.full(4, rounds, dtype=np.float32),
                       history=((1.0 + rounds, 0.1, rounds),), rounds=tuple(range(1, rounds + 1)))


def test_writes_alternate_between_the_slots_and_a_fresh_store_reads_the_newest(tmp_path):
    store = SlotStateStore(tmp_path, "sim-7")
    assert store.load() is None
    for r in range(1, 6):
        store.save(state(r))
        assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(r))
    slots = [json.loads((tmp_path / f"sim-7.{k}.json").read_text()) for k in (0, 1)]
    assert sorted(s["seq"] for s in slots) == [3, 4]  # writes 0..4: the last two survive, one per slot
    # A save through a store that never loaded still learns which slot is newest and keeps it.
    SlotStateStore(tmp_path, "sim-7").save(state(6))
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(6))
    SlotStateStore(tmp_path, "sim-7").save(state(2))  # a shorter state over a longer file: cut to length
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(2))


def test_a_write_cut_off_part_way_leaves_the_state_before_it(tmp_path, caplog):
    store = SlotStateStore(tmp_path, "sim-7")
    store.save(state(1))
    store.save(state(2))
    store.save(state(3))  # write 2, in slot 0
    newest = tmp_path / "sim-7.0.json"
    whole = newest.read_bytes()
    older = state(1).to_bytes(seq=0)  # what slot 0 held before write 2
    assert whole[:9] == b'{"seq": 2' and older[:9] == b'{"seq": 0'
    for cut in (9, len(whole) // 3, len(whole) - 2):
        # The process killed while overwriting slot 0 in place: the new bytes' head over the old file's tail
        # (cut 9: the new write counter over the old state, which only the sealed counter can catch).
        torn = whole[:cut] + older[cut:] if cut < len(older) else whole[:cut]
        newest.write_bytes(torn)
        with caplog.at_level("WARNING", logger="fedrec.state"):
            assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(2))  # as if the write never happened
        assert "damaged" in caplog.text
        caplog.clear()
    # The next write goes to the damaged slot, never over the intact one.
    again = SlotStateStore(tmp_path, "sim-7")
    again.load()
    again.save(state(4))
    assert json.loads(newest.read_text())["seq"] == 2 and _same(SlotStateStore(tmp_path, "sim-7").load(), state(4))


def test_a_tampered_write_counter_is_caught_by_the_checksum(tmp_path):
    store = SlotStateStore(tmp_path, "sim-7")
    store.save(state(5))  # slot 0, write 0
    store.save(state(6))  # slot 1, write 1
    doc = json.loads((tmp_path / "sim-7.0.json").read_text())
    doc["seq"] = 9  # an old state dressed as the newest, to drop a charge
    (tmp_path / "sim-7.0.json").write_text(json.dumps(doc))
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(6))


def test_no_intact_slot_is_refused_not_reset(tmp_path):
    store = SlotStateStore(tmp_path, "sim-7")
    store.save(state(1))
    (tmp_path / "sim-7.0.json").write_bytes(b'{"seq": 0, "sha')  # the only slot written, damaged
    with pytest.raises(StateError, match="no intact copy of its state"):
        SlotStateStore(tmp_path, "sim-7").load()
    (tmp_path / "sim-7.1.json").write_bytes(b"garbage")
    with pytest.raises(StateError, match="no intact copy"):
        SlotStateStore(tmp_path, "sim-7").save(state(2))  # a save must not start over either


def test_a_state_file_from_before_the_slots_is_resumed_from(tmp_path):
    FileStateStore(tmp_path / "sim-7.json").save(state(3))
    store = SlotStateStore(tmp_path, "sim-7")
    assert _same(store.load(), state(3))
    store.save(state(4))
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(4))
    # A single file's checksum does not pass as a slot's (the write counter is sealed in a slot's checksum).
    (tmp_path / "sim-7.1.json").write_bytes(state(9).to_bytes())
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(4))


def _same(a: DeviceState | None, b: DeviceState) -> bool:
    assert a is not None
    return a.to_bytes() == b.to_bytes()


def test_a_slot_that_cannot_be_read_is_refused_never_passed_over(tmp_path):
    """An unreadable slot may hold the newest state: falling back to the other, and then overwriting the
    unreadable one on the next save, would drop a charge for good."""
    store = SlotStateStore(tmp_path, "sim-7")
    store.save(state(1))
    store.save(state(2))  # write 1, slot 1: the newest
    newest = tmp_path / "sim-7.1.json"
    newest.rename(tmp_path / "kept")
    newest.mkdir()  # reading it now fails with an OSError (IsADirectoryError), as EIO or EMFILE would
    with pytest.raises(StateError, match="cannot read device state"):
        SlotStateStore(tmp_path, "sim-7").load()
    newest.rmdir()
    (tmp_path / "kept").rename(newest)
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(2))


def test_slots_are_ranked_by_the_counter_under_the_checksum_not_by_their_layout(tmp_path):
    store = SlotStateStore(tmp_path, "sim-7")
    store.save(state(1))
    store.save(state(2))  # write 1, slot 1
    newest = tmp_path / "sim-7.1.json"
    newest.write_text(json.dumps(json.loads(newest.read_text()), indent=2))  # someone pretty-printed it
    again = SlotStateStore(tmp_path, "sim-7")
    assert _same(again.load(), state(2))
    again.save(state(3))  # into slot 0, over the older state
    assert json.loads((tmp_path / "sim-7.0.json").read_text())["seq"] == 2
    assert _same(SlotStateStore(tmp_path, "sim-7").load(), state(3))


def test_a_failed_load_never_lets_the_same_store_start_over(tmp_path):
    (tmp_path / "sim-7.json").write_bytes(b'{"sha256": "0", "state": {}}')  # a damaged single file
    store = SlotStateStore(tmp_path, "sim-7")
    with pytest.raises(StateError):
        store.load()
    with pytest.raises(StateError):
        store.save(state(1))  # the save loads again, and refuses again
    assert not list(tmp_path.glob("sim-7.*.json"))


def test_numbers_no_state_holds_are_state_errors_not_crashes(tmp_path):
    """Sealed with a valid checksum (it is a checksum, not a signature), values out of range still never crash."""
    payload = state(1).payload()
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    for old, new in ((b'"user_row":[1.0', b'"user_row":[' + b"9" * 400), (b'"user_row":[1.0', b'"user_row":[NaN'),
                     (b'"rounds":[1]', b'"rounds":[' + b"9" * 5000 + b"]")):
        crafted = body.replace(old, new, 1)
        assert crafted != body
        digest = hashlib.sha256(b"0:" + crafted).hexdigest()
        (tmp_path / "sim-7.0.json").write_bytes(b'{"seq": 0, "sha256": "%s", "state": ' % digest.encode() + crafted + b"}")
        with pytest.raises(StateError, match="no intact copy"):
            SlotStateStore(tmp_path, "sim-7").load()
