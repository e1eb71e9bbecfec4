"""``capture-histories --attach`` re-seals a running stack's payloads with the
TEST-ONLY replay key, so histories captured from ``make run`` (its own dev key)
replay like the ones captured on a stack of the command's own."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

from config.codec import ENCODING, KEY_ID_METADATA, AesGcmCodec, new_payload_key, parse_payload_keys
from devstack.histories import payloads_in, replay_only_codec, reseal
from workflows.payment import PaymentWorkflow

SUCCESS = Path(__file__).parent / "histories" / "success.json"


def _sealed(history: WorkflowHistory) -> list[tuple[bytes, bytes]]:
    return [
        (p.metadata[KEY_ID_METADATA], p.data)
        for e in history.events
        for p in payloads_in(e)
        if p.metadata.get("encoding") == ENCODING
    ]


async def test_a_history_sealed_with_another_key_is_resealed_with_the_replay_key() -> None:
    replay_codec = replay_only_codec()
    dev_codec = AesGcmCodec(parse_payload_keys(f"dev1:{new_payload_key()}"), "dev1")
    # A history as a dev stack would have written it: sealed with its own key.
    history = WorkflowHistory.from_json("wf", SUCCESS.read_text())
    clear_before = [
        p.SerializeToString()
        for e in history.events
        for p in payloads_in(e)
        if p.metadata.get("encoding") != ENCODING
    ]
    assert clear_before, "search attributes stay in clear"
    assert reseal(history, replay_codec, dev_codec) > 0
    assert {key_id for key_id, _ in _sealed(history)} == {b"dev1"}

    count = reseal(history, dev_codec, replay_codec)

    assert count == len(_sealed(history)) > 0
    assert {key_id for key_id, _ in _sealed(history)} == {b"replay-test-only"}
    assert [
        p.SerializeToString()
        for e in history.events
        for p in payloads_in(e)
        if p.metadata.get("encoding") != ENCODING
    ] == clear_before
    replayer = Replayer(
        workflows=[PaymentWorkflow], data_converter=DataConverter(payload_codec=replay_codec)
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None
