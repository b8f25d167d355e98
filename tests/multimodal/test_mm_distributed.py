"""Features gathered across ranks: two CPU processes (gloo), each with half of a batch, give
the loss and (DDP-averaged) gradients of one process holding the whole batch; the momentum
queues stay equal on both ranks; unequal batch sizes fail on every rank with the fix named."""

import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from autoglm.config import OpenAutoGLMConfig
    from autoglm.model import AutoGLMBackbone
    from autoglm.multimodal.encoders import ImageEncoderConfig
    from autoglm.multimodal.model import AlignModel, LossConfig

    OUT = sys.argv[1]

    def build(momentum, how):
        torch.manual_seed(0)
        text = AutoGLMBackbone(OpenAutoGLMConfig.from_name("tiny", vocab_size=300, num_experts=0))  # no MoE aux
        img = ImageEncoderConfig(image_size=8, patch_size=4, dim=32, layers=1, heads=4, ffn_hidden=64)
        return AlignModel(img, text, LossConfig(embed_dim=16, momentum=momentum, queue_size=5,
                                                distill_alpha=0.4 if momentum else 0.0, false_negatives=how))

    def data():
        g = torch.Generator().manual_seed(1)
        imgs, ids = torch.rand(6, 1, 8, 8, generator=g), torch.randint(2, 300, (6, 5), generator=g)
        mask = torch.ones(6, 5, dtype=torch.long)
        mask[1, 3:] = 0
        ids[4] = ids[0]  # one caption on both ranks: a false negative across ranks
        return imgs, ids, mask, torch.tensor([0, 1, 0, 2, 1, 2])

    def steps(model, rows):
        imgs, ids, mask, labels = data()
        losses = []
        for _ in range(2):  # the second step scores against the queue the first one filled
            out = model(imgs[rows], ids[rows], mask[rows], labels[rows])
            out["loss"].backward()
            losses.append(out["loss"].detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.stack(losses), grads

    VARIANTS = [(0.0, "ignore"), (0.0, "same_label"), (0.9, "same_caption")]

    def worker(rank):
        dist.init_process_group("gloo", init_method=f"file://{OUT}.store", rank=rank, world_size=2)
        res = {}
        for k, (m, how) in enumerate(VARIANTS):
            losses, grads = steps(build(m, how), slice(3 * rank, 3 * rank + 3))
            dist.all_reduce(losses)  # DDP: the mean over ranks
            for n, g in grads.items():
                dist.all_reduce(g)
                res[f"{k}/grad/{n}"] = g / 2
            res[f"{k}/loss"] = losses / 2
        model = build(0.9, "ignore")
        steps(model, slice(3 * rank, 3 * rank + 3))
        both = [torch.empty_like(model.image_queue) for _ in range(2)]
        dist.all_gather(both, model.image_queue)
        res["queues_equal"] = torch.tensor(torch.equal(both[0], both[1]))
        try:
            build(0.0, "ignore")(*[t[: 3 - rank] for t in data()])
            res["short"] = torch.tensor(0)
        except ValueError as e:
            res["short"] = torch.tensor(1)
            res["short_msg"] = torch.tensor(list(str(e).encode()))
        dist.destroy_process_group()  # the reference runs as one process
        if rank == 0:
            ref = {}
            for k, (m, how) in enumerate(VARIANTS):
                losses, grads = steps(build(m, how), slice(0, 6))
                ref[f"{k}/loss"] = losses
                ref.update({f"{k}/grad/{n}": g for n, g in grads.items()})
            torch.save({"dist": res, "ref": ref}, OUT)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.spawn(worker, nprocs=2)
''')


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "result.pt"
    r = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(out, weights_only=True)
    got, ref = res["dist"], res["ref"]
    for k in range(3):
        assert torch.allclose(got[f"{k}/loss"], ref[f"{k}/loss"], atol=1e-5), (k, got[f"{k}/loss"], ref[f"{k}/loss"])
        names = [n for n in ref if n.startswith(f"{k}/grad/")]
        assert names and set(names) == {n for n in got if n.startswith(f"{k}/grad/")}
        for n in names:
            assert torch.allclose(got[n], ref[n], atol=1e-4, rtol=1e-4), n
    assert bool(got["queues_equal"]) and int(got["short"]) == 1
    assert "same size" in bytes(got["short_msg"].tolist()).decode() and "drop the short last batch" in \
        bytes(got["short_msg"].tolist()).decode()


def test_one_rank_needs_no_process_group():
    from autoglm.multimodal.losses import gather_features, world_info

    x = torch.randn(3, 2)
    assert world_info() == (1, 0) and gather_features(x) is x
