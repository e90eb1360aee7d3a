"""The message log (node config ``message-log``) records what enters and leaves a silo; its old
name ``audit-log`` still works and warns, since "audit" now means only the privacy audit."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from seedtune.client.message_log import message_log_mod


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch):
    """Flower's Message needs a run identity outside a Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _exchange(node_config: dict) -> None:
    asked = Message(RecordDict({"request": ConfigRecord({"step": 3, "probe_seeds": [11, 12]})}), dst_node_id=7,
                    message_type=MessageType.TRAIN, group_id="3")

    def answer(message: Message, context: Context) -> Message:
        return Message(RecordDict({"reply": ConfigRecord({"projected_grads": [0.5, -0.25]})}), reply_to=message)

    message_log_mod(asked, _context(node_config), answer)


def test_the_message_log_records_each_message_in_and_out(tmp_path):
    path = tmp_path / "messages.jsonl"
    _exchange({"message-log": str(path)})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["direction"] for line in lines] == ["in", "out"]
    assert lines[0]["records"]["request"]["values"]["probe_seeds"] == [11, 12]
    assert lines[1]["records"]["reply"]["values"]["projected_grads"] == [0.5, -0.25]


def test_the_old_name_audit_log_still_works_and_warns(tmp_path):
    path = tmp_path / "old.jsonl"
    with pytest.warns(DeprecationWarning, match="audit-log is deprecated: rename it message-log"):
        _exchange({"audit-log": str(path)})
    assert len(path.read_text().splitlines()) == 2


def test_without_the_setting_nothing_is_written(tmp_path, recwarn):
    _exchange({})
    assert list(tmp_path.iterdir()) == [] and not [w for w in recwarn if w.category is DeprecationWarning]
