"""The resume journal: folding its lines gives back exactly the state each commit point saved, lines after the
committed one (saved but not committed, or cut short by a crash) go, and each line holds only what is new."""

import json

import torch

from slim.resume import ResumeStore


def state_after(layer: int, variant: str = "") -> tuple[dict, list[dict]]:
    """A writer state and module reports that grow layer by layer, as a run's do."""
    shards = [[f"model-{i:05d}.safetensors", [f"t{i}.{j}" for j in range(3)], 100 * i] for i in range(layer // 2)]
    checksums = {f"l{i}.t{j}": f"{variant}{i:02d}{j:02d}" for i in range(layer + 1) for j in range(4)}
    first = layer - layer % 2  # the open shard holds layers first..layer; its entries grow until it closes
    current = {"file": f"model-{layer // 2:05d}.safetensors",
               "entries": {f"l{i}.t{j}": {"dtype": "F32", "data_offsets": [i, j]} for i in range(first, layer + 1)
                           for j in range(40)},
               "data_bytes": 1000 + layer, "reserve": 65536}
    modules = [{"name": f"l{i}.m{j}", "sqnr_db": float(i + j)} for i in range(layer + 1) for j in range(3)]
    return {"shards": shards, "checksums": checksums, "current": current}, modules


def save(store, layer, variant=""):
    writer, modules = state_after(layer, variant)
    store.save_layer(layer, writer, modules, [torch.full((2, 3), float(layer))])


def loaded(store, layer):
    commit = store.load_layer(layer, torch.device("cpu"))
    assert torch.equal(commit.hidden[0], torch.full((2, 3), float(layer)))
    return commit.writer, commit.modules


def test_folding_gives_back_each_saved_state_and_lines_stay_small(tmp_path):
    store = ResumeStore(tmp_path, 0, "fp")
    for layer in range(6):
        save(store, layer)
    lines = store.journal.read_text().splitlines()
    assert len(lines) == 6 and len(lines[5]) < 2 * len(lines[1])  # only what is new
    current = [json.loads(line)["current"] for line in lines]
    # the open shard's entries: all of them for a new file, then only those added since the line before
    assert [(c["entries_before"], len(c["entries"])) for c in current] == [(0, 40), (40, 40)] * 3
    for layer in (5, 4):  # the hidden states of the last two commit points are kept
        assert loaded(ResumeStore(tmp_path, 0, "fp"), layer) == state_after(layer)


def test_a_resume_drops_later_lines_and_continues_the_journal(tmp_path):
    store = ResumeStore(tmp_path, 0, "fp")
    for layer in range(4):
        save(store, layer)
    with open(store.journal, "a") as f:
        f.write('{"layer": 4, "shards": [')  # a crash in the middle of the next line
    resumed = ResumeStore(tmp_path, 0, "fp")
    assert loaded(resumed, 3) == state_after(3)  # the committed layer; layer 3's line stays, the partial goes
    assert len(resumed.journal.read_text().splitlines()) == 4
    save(resumed, 4, variant="x")  # the rerun continues from the folded state
    writer, modules = loaded(ResumeStore(tmp_path, 0, "fp"), 4)
    expected_writer, expected_modules = state_after(4)
    expected_writer["checksums"].update({f"l4.t{j}": f"x04{j:02d}" for j in range(4)})
    assert (writer, modules) == (expected_writer, expected_modules)


def test_a_new_store_starts_a_new_journal(tmp_path):
    old = ResumeStore(tmp_path, 0, "fp")
    for layer in range(3):
        save(old, layer)
    fresh = ResumeStore(tmp_path, 0, "fp")
    save(fresh, 0, variant="y")
    lines = [json.loads(line) for line in fresh.journal.read_text().splitlines()]
    assert [line["layer"] for line in lines] == [0]
    writer, _ = loaded(ResumeStore(tmp_path, 0, "fp"), 0)
    assert writer["checksums"] == {f"l0.t{j}": f"y00{j:02d}" for j in range(4)}


def test_a_resume_in_the_middle_of_an_open_shard_continues_its_entries(tmp_path):
    store = ResumeStore(tmp_path, 0, "fp")
    for layer in range(6):
        save(store, layer)
    resumed = ResumeStore(tmp_path, 0, "fp")
    assert loaded(resumed, 4) == state_after(4)  # model-00002 open with layer 4's entries; line 5 goes
    save(resumed, 5)  # the rerun's next line holds only layer 5's entries of that shard
    assert json.loads(resumed.journal.read_text().splitlines()[-1])["current"]["entries_before"] == 40
    assert loaded(ResumeStore(tmp_path, 0, "fp"), 5) == state_after(5)
