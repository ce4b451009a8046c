import json

import pytest

from fedunlearn.errors import ConfigError
from fedunlearn.ledger import DeletionRequest, Ledger, requests_from_config, requests_from_file, screen_requests


def test_forget_clients_become_one_client_request_each():
    requests = requests_from_config(" 0, 3,")
    assert [(r.grain, r.clients) for r in requests] == [("client", (0,)), ("client", (3,))]
    assert len({r.request_id for r in requests}) == 2
    assert requests_from_config("") == []
    with pytest.raises(ConfigError) as caught:
        requests_from_config("0,a")
    assert caught.value.key == "forget-clients"


def test_request_file_speaks_all_three_grains(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"requests": [
        {"grain": "client", "client": 2},
        {"grain": "samples", "client": 1, "indices": [0, 4]},
        {"grain": "class", "class": 7},
    ]}))
    client, samples, label = requests_from_file(path)
    assert client.clients == (2,)
    assert samples.grain == "samples" and samples.sample_indices == (0, 4)
    assert label.grain == "class" and label.label == 7


@pytest.mark.parametrize("content, key", [
    ('[{"grain": "shard", "client": 1}]', "deletion-requests[0]: grain"),
    ('[{"grain": "samples", "client": 1}]', "deletion-requests[0]: indices"),
    ("not json", "deletion-requests"),
])
def test_bad_request_files_are_config_errors(tmp_path, content, key):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        requests_from_file(path)
    assert caught.value.key == key


def test_screening_refuses_unknown_repeated_and_unsupported_requests(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(DeletionRequest(grain="client", clients=(4,)), "applied", method="hf-kcu")
    requests = [
        DeletionRequest(grain="client", clients=(1,)),
        DeletionRequest(grain="client", clients=(9,)),  # unknown
        DeletionRequest(grain="client", clients=(4,)),  # deleted before
        DeletionRequest(grain="client", clients=(1,)),  # deleted by the first request of this batch
        DeletionRequest(grain="class", label=3),  # no method yet
    ]
    accepted = screen_requests(requests, known_clients=range(5), ledger=ledger)
    assert accepted == [requests[0]]
    events = ledger.events()[1:]
    assert [event["status"] for event in events] == ["pending", "refused", "refused", "refused", "refused"]
    assert "unknown client(s) [9]" in events[1]["reason"]
    assert "already deleted" in events[2]["reason"] and "already deleted" in events[3]["reason"]
    assert "grain 'class'" in events[4]["reason"]


def test_ledger_is_append_only_json_lines(tmp_path):
    path = tmp_path / "ledger.jsonl"
    request = DeletionRequest(grain="client", clients=(0,))
    Ledger(path).append(request, "pending")
    Ledger(path).append(request, "applied", method="kfac", seconds=0.5, epsilon=2.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["request_id"] == second["request_id"] == request.request_id
    assert (first["status"], second["status"], second["epsilon"]) == ("pending", "applied", 2.0)


def test_a_second_run_into_the_same_out_dir_says_it_refused_the_deletion(tmp_path, capsys):
    """The ledger is the out-dir's: running the same job there again refuses the repeated request. The
    run must say so (results.json and the printed summary), not print a table with no method in it."""
    from clients.client_app import build_client_app
    from fake_grid import FakeGrid
    from fedunlearn import config as run_config
    from fedunlearn.report import print_summary
    from fedunlearn.summary import RunSpec, StudyRecord
    from strategies.server_app import FederatedJob

    config = run_config.resolve({"model": "logreg", "num-clients": 3, "num-rounds": 1, "local-epochs": 1, "mia-shadows": 0,
                                 "retrain-cache": False, "noise-floor": False, "unlearn-methods": "finetune",
                                 "out-dir": str(tmp_path)})
    first = FederatedJob(FakeGrid(build_client_app(bound_config=config), 3), config, None, None).run()
    assert first.refused_requests == [] and "finetune" in first.methods
    second = FederatedJob(FakeGrid(build_client_app(bound_config=config), 3), config, None, None).run()
    assert list(second.methods) == ["original"]
    assert second.refused_requests == [{"clients": [0], "grain": "client", "reason": "client(s) [0] already deleted by an earlier request"}]
    assert json.loads((tmp_path / "results.json").read_text())["refused_requests"] == second.refused_requests
    study = StudyRecord(config)
    study.runs.append((RunSpec(0, "0", tmp_path), second))
    print_summary(study)
    assert "deletion of client(s) [0] refused" in capsys.readouterr().out
