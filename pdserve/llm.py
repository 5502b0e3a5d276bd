"""Offline Python API in vLLM's shape: LLM(model).generate(prompts, params) and .chat(...)."""
from __future__ import annotations

from tqdm.auto import tqdm

from pdserve import cpu_threads
from pdserve.config import EngineConfig

cpu_threads.prepare_env()   # before the engine's modules load torch (libgomp reads it once)
from pdserve.engine.engine import LLMEngine  # noqa: E402
from pdserve.engine.outputs import RequestOutput  # noqa: E402
from pdserve.engine.request import SamplingParams  # noqa: E402


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The index-th of n samples: its own seed (derived from the request's) and n=1."""
    from dataclasses import replace
    seed = None if params.seed is None else hash((params.seed, index)) & 0x7FFFFFFF if index else params.seed
    return replace(params, n=1, seed=seed)


class LLM:
    def __init__(self, model: str | None = None, num_threads: int | None = None, cpus: str | None = None,
                 **engine_args):
        """num_threads / cpus: torch CPU threads and cores to pin to (default: cpu_threads' choice)."""
        cpu_threads.setup(cpus, num_threads)
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = []  # validate everything before queueing anything
        for i, (p, sp) in enumerate(zip(prompts, params)):
            for j in range(sp.n):
                seqs.append((i, self.engine.make_sequence(p, child_params(sp, j), f"{i}-{j}")))
        return self._run(seqs, len(prompts), use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.engine.chat_prompt_ids(c, chat_template)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, seqs, num_prompts: int, use_tqdm: bool) -> list[RequestOutput]:
        for _, (seq, text) in seqs:
            self.engine.add_sequence(seq, text)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(seqs), desc="generating", unit="req", disable=not use_tqdm)
        while len(done) < len(seqs):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
                    if out.error:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        bar.close()
        results: list[RequestOutput | None] = [None] * num_prompts
        for i, (seq, _) in seqs:
            o = done[seq.request_id]
            if results[i] is None:
                o.request_id = str(i)
                results[i] = o
            else:
                o.outputs[0].index = len(results[i].outputs)
                results[i].outputs.append(o.outputs[0])
        return results
