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


def test_a_format_1_state_is_charged_at_its_own_share_figure(tmp_path):
    """Format 1 accounted secure-mode releases as if the server followed the protocol, with keys it could
    substitute: read now, its own-share history is the headline (the budget's), its old headline the honest one."""
    honest, own = [[1.0, 1.0, 3]], [[0.12, 1.0, 3]]
    payload = {"format": 1, "device_id": "d", "user_row": None, "history": honest, "rounds": [1, 2, 3],
               "declined": [], "refused": [], "non_private": False, "subverted_history": own, "user_history": [],
               "user_subverted_history": [], "not_user_level": True, "user_row_exact": None}
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    doc = {"sha256": hashlib.sha256(body).hexdigest(), "state": payload}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    migrated = FileStateStore(tmp_path / "s.json").load()
    assert migrated.history == ((0.12, 1.0, 3),) and migrated.honest_history == ((1.0, 1.0, 3),)
    assert migrated.subverted_history == migrated.history and migrated.secure_sums == ()
    again = DeviceState.from_bytes(migrated.to_bytes(), source="x")  # written back in format 2: the same state
    assert again == migrated


def test_interleaved_messages_on_one_state_keep_every_charge(tmp_path):
    """Two messages for one device (processes sharing its state path): each reserves (admit + charge under the
    lock) and stores its trained row after, re-reading the state; no interleaving erases the other's charge."""
    import threading

    from fedrec.shared.device import Device, DeviceSettings
    from fedrec.shared.policy import PrivacyPolicy
    from tests.helpers import plan

    path = tmp_path / "state.json"

    def device() -> Device:  # a fresh object per message, as a fresh process per message would build it
        return Device("d", 1, lambda: None, FileStateStore(path), DeviceSettings(4, 0.1, 0),
                      PrivacyPolicy(epsilon_budget=1e4))

    first, second = device(), device()
    verdict, before = first.reserve(plan(server_round=1))  # message 1 charged, training...
    assert verdict is None and not before.history
    verdict, _ = second.reserve(plan(server_round=2))  # message 2 arrives meanwhile and is charged too
    assert verdict is None
    first.store_row(plan(server_round=1), np.ones(4, dtype=np.float32))  # message 1 finishes last
    final = FileStateStore(path).load()
    both = [*plan(server_round=1).privacy_steps(), *plan(server_round=2).privacy_steps()]
    assert final.rounds == (1, 2) and sum(n for _, _, n in final.history) == sum(n for _, _, n in both)
    np.testing.assert_array_equal(final.user_row, np.ones(4, dtype=np.float32))

    # and under real contention: many threads reserving at once never lose a charge
    threads = [threading.Thread(target=lambda r=r: device().reserve(plan(server_round=r))) for r in range(3, 23)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(FileStateStore(path).load().rounds) == list(range(1, 23))


def test_a_refusal_recorded_at_the_key_stage_never_erases_a_charge_stored_meanwhile(tmp_path):
    """The key stage records refusals under the state's lock, on the state as stored then (Device.screen): a charge
    a concurrent task stored after this message started is kept (a hostile review found it overwritten)."""
    from fedrec.shared.device import Device, DeviceSettings
    from fedrec.shared.policy import PrivacyPolicy
    from tests.helpers import plan

    d = Device("d", 1, lambda: None, FileStateStore(tmp_path / "s.json"), DeviceSettings(4, 0.1, 0),
               PrivacyPolicy())
    p = plan(privacy="distributed", noise_multiplier=1.0)
    assert d.reserve(p, 10, 1)[0] is None  # a concurrent masked stage: charged
    refused = d.screen(p, 1, 0)  # then the key stage of another request: t = 1 is refused and recorded
    assert refused is not None and refused.refused == "min-aggregation-threshold"
    after = d.load_state()
    assert after.rounds == (1,) and after.history and after.refused == ((1, "min-aggregation-threshold"),)


def test_two_requests_racing_on_one_deployed_session_never_both_pass_a_stage(tmp_path):
    """A deployed device keeps its secure-sum session in a file behind a lock, loaded, advanced and saved in one
    step: a second request for the same stage (Flower may run both as parallel processes, each from one Context
    snapshot) finds the stage passed and is refused, so it can neither mask a second vector with the same masks
    nor sign a second survivor view (the hostile review's race, which Context.state allowed)."""
    import os

    from fedrec.client.nodes import SessionStore
    from fedrec.shared.identity import Authority, DeviceIdentity
    from fedrec.shared.secagg import ClientSession, SecAggError, SessionParams, ServerSession

    authority = Authority.create()
    ids = [f"d{k}" for k in range(5)]
    identities = {i: DeviceIdentity.enrol(i, authority) for i in ids}
    params = SessionParams(os.urandom(16), 4, 3, colluders=1)
    server = ServerSession(params)
    sessions, adverts = {}, {}
    for i in ids:
        sessions[i], adverts[i] = ClientSession.start(params, identities[i])
    relay, _ = server.receive_keys(adverts)
    routed = server.route_shares({i: sessions[i].share_keys(relay, authority.key.public_key()) for i in ids})
    store = SessionStore(path=tmp_path / "secagg-session.json")
    store.save(sessions["d0"], plan="x")

    def advance(step) -> object:  # what every stage handler does: load, advance, save, under the lock
        with store.locked():
            session, saved = store.load()
            out = step(session)
            store.save(session, **saved)
            return out

    advance(lambda s: s.receive_shares(routed["d0"]))
    with pytest.raises(SecAggError, match="out of order"):
        advance(lambda s: s.receive_shares(routed["d0"]))  # the racing masked request: refused before training
    advance(lambda s: s.mask_input(np.zeros(3, dtype=np.uint64)))
    advance(lambda s: s.consistency(ids[:4], [ids[4]], identities["d0"]))
    with pytest.raises(SecAggError, match="out of order"):
        advance(lambda s: s.consistency(ids, [], identities["d0"]))  # a second view: refused
    assert (tmp_path / "secagg-session.json").stat().st_mode & 0o777 == 0o600  # it holds the session's secrets
