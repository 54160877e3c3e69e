"""Checkpoints: exact round trip of weights, optimizers and random stream; pruning; clear mismatch errors."""

import pytest
import torch
from torch import nn

from hagan.errors import HaganError
from hagan.training.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


def trained_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.0, 0.999))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return net, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    net, opt = trained_net()
    rng = torch.Generator().manual_seed(7)
    torch.randn(3, generator=rng)
    path = save_checkpoint(tmp_path, 3, net, {"G": opt}, rng, {"extra": {"p": 0.25}}, keep=2)
    expected_next = torch.randn(4, generator=rng)

    other, other_opt = trained_net(seed=1)
    other_rng = torch.Generator().manual_seed(0)
    state = load_checkpoint(path, other, {"G": other_opt}, other_rng)
    assert state == {"iteration": 3, "extra": {"p": 0.25}}
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(torch.randn(4, generator=other_rng), expected_next)

    batch = torch.randn(5, 4)
    for model, optimizer in ((net, opt), (other, other_opt)):
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_keeps_the_newest_and_ignores_unfinished(tmp_path):
    net, opt = trained_net()
    rng = torch.Generator()
    for it in (10, 20, 30):
        save_checkpoint(tmp_path, it, net, {"G": opt}, rng, {}, keep=2)
    (tmp_path / ".tmp-iter_00000040").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_00000020", "iter_00000030"]


def test_mismatched_weights_name_the_tensor(tmp_path):
    net, opt = trained_net()
    path = save_checkpoint(tmp_path, 1, net, {"G": opt}, torch.Generator(), {}, keep=1)
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(HaganError, match=r"tensor 0.weight has shape \(8, 4\), the model expects \(16, 4\)"):
        load_weights(wider, path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HaganError, match="junk.safetensors: cannot read weights"):
        load_weights(net, tmp_path / "junk.safetensors")


def test_pickle_weights_are_refused_unless_allowed_and_then_weights_only(tmp_path):
    net, _ = trained_net()
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(HaganError, match=r"model.pt: refusing to load a pickle checkpoint .*allow_pickle=True \(--allow-pickle\)"):
        load_weights(net, path)
    other, _ = trained_net(seed=1)
    load_weights(other, path, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert load_checkpoint(path, other, None, None, allow_pickle=True) == {"iteration": 0}

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(HaganError, match="evil.pth: cannot read weights"):
        load_weights(net, tmp_path / "evil.pth", allow_pickle=True)  # weights_only refuses the object
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(HaganError, match=r"tensor 0.weight has shape \(8, 4\)"):
        load_weights(wider, path, allow_pickle=True)


def test_pruning_and_leftovers_never_look_complete(tmp_path):
    net, opt = trained_net()
    rng = torch.Generator()
    for it in (1, 2):
        save_checkpoint(tmp_path, it, net, {"G": opt}, rng, {}, keep=5)
    # what a kill can leave: an unfinished write, a half-deleted pruned folder, a folder without weights
    (tmp_path / ".tmp-iter_00000003").mkdir()
    (tmp_path / ".trash-iter_00000000").mkdir()
    (tmp_path / "iter_00000009").mkdir()
    (tmp_path / "iter_00000009" / "state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_00000001", "iter_00000002"]
    assert sorted(p.name for p in clean_partial(tmp_path)) == [".tmp-iter_00000003", ".trash-iter_00000000"]
    save_checkpoint(tmp_path, 2, net, {"G": opt}, rng, {"again": True}, keep=1)  # rewriting an existing one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_00000002"]
    assert load_checkpoint(tmp_path / "iter_00000002", net, None, None)["again"] is True
    with pytest.raises(HaganError, match="bare weights file cannot be resumed"):
        load_checkpoint(tmp_path / "iter_00000002" / "weights.safetensors", net, {"G": opt}, rng)
