"""Drive a real Scheduler + ModelRunner to the end and keep the logits of every sampled token."""


def drive_with_logits(runner, sched, seqs) -> dict:
    """Run seqs to completion; returns request id -> list of logits rows, one per sampled token."""
    for s in seqs:
        sched.add(s)
    captured = []
    real = runner.sampler   # it takes a step's logits rows in out.seqs order, however the step ran
    runner.sampler = lambda lg, rows: captured.append(lg) or real(lg, rows)
    logits = {s.request_id: [] for s in seqs}
    while sched.has_work():
        out = sched.schedule()
        captured.clear()
        tokens, _ = runner.execute(out, lambda s: ())
        rows = iter(captured[0]) if captured else iter(())
        for s, t in zip(out.seqs, tokens):
            if t is not None:
                logits[s.request_id].append(next(rows))
        sched.update(out, tokens)
    return logits


def worst_logit_error(hf, seqs, logits) -> float:
    """The largest error of drive_with_logits' rows against a transformers model's float32 logits
    of the same tokens, relative to the reference row's largest magnitude."""
    import torch
    worst = 0.0
    for s in seqs:
        with torch.inference_mode():
            ref = hf(torch.tensor([s.token_ids[:-1]])).logits[0].float()
        for step, got in enumerate(logits[s.request_id]):
            want = ref[s.num_prompt_tokens - 1 + step]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst
