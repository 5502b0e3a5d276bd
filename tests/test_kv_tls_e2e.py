"""TLS on the KV path between real worker processes (the default model, loopback, tcp): a
prefill worker serving KV over TLS (--kv-tls-cert/--kv-tls-key), a decode worker that trusts
its CA (--kv-tls-ca) gets exactly what a colocated run gives, with the KV pulled over tcp, not
recomputed; a decode worker without the CA is refused with an error that says why."""
from __future__ import annotations

import shutil

import pytest
from openai import APIError, OpenAI

from pdserve import procs
from test_kv_e2e import MODEL, decode, metric, prefill, wait_zero_usage
from test_kv_tls import make_ca, make_cert

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]

BASE = ["--kv-cache-memory", "128MiB", "--max-num-batched-tokens", "512", "--kv-transport", "tcp"]
PROMPT = "Over TLS the KV cache crosses an untrusted network: the prefill worker proves itself with a certificate. "


@pytest.fixture(scope="module")
def workers(default_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls_pki")
    make_ca(d, "ca")
    make_cert(d, "kv", "ca", "IP:127.0.0.1")
    flags = {"prefill": ["--role", "prefill", "--kv-tls-cert", str(d / "kv.pem"), "--kv-tls-key", str(d / "kv.key")],
             "dec_tls": ["--role", "decode", "--kv-tls-ca", str(d / "ca.pem")],
             "dec_plain": ["--role", "decode", "--kv-load-failure-policy", "fail"]}
    urls, ps = {}, {}
    try:
        for name, f in flags.items():
            port = procs.free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            ps[name] = procs.start(procs.pdserve_command("serve", "--port", port, *BASE, *f), d / f"{name}.log",
                                   env={"OMP_NUM_THREADS": "1", "PDSERVE_KV_SECRET": "tls-e2e"})
        for name in flags:
            procs.wait_healthy(urls[name], ps[name], timeout=300)
        yield {"urls": urls, "procs": ps}
    finally:
        for p in ps.values():
            procs.stop(p)


def test_a_hand_off_over_tls_equals_colocated(workers):
    # colocated: a worker (the other decode one) prefills the prompt itself; not dec_tls, whose
    # prefix cache would then hold the prompt and pull less
    ref = OpenAI(base_url=workers["urls"]["dec_plain"] + "/v1", api_key="EMPTY", max_retries=0, timeout=120) \
        .completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    blocks0 = metric(workers["urls"]["dec_tls"], "pdserve:kv_transfer_blocks_total")
    kvp = prefill(workers, "prefill", PROMPT, temperature=0).model_extra["kv_transfer_params"]
    out = decode(workers, "dec_tls", kvp, 12, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.choices[0].text, ref.choices[0].finish_reason)
    assert out.usage.completion_tokens == ref.usage.completion_tokens
    # pulled, all of it, over tcp (inside TLS): not recomputed
    assert metric(workers["urls"]["dec_tls"], "pdserve:kv_transfer_blocks_total") - blocks0 == len(kvp["remote_block_ids"])
    assert metric(workers["urls"]["prefill"], "pdserve:kv_transfer_bytes_total", 'direction="served",transport="tcp"') > 0
    wait_zero_usage(workers, ["prefill", "dec_tls"])


def test_a_decode_worker_without_the_ca_is_refused_clearly(workers):
    kvp = prefill(workers, "prefill", "[plain] " + PROMPT, temperature=0).model_extra["kv_transfer_params"]
    with pytest.raises(APIError) as e:
        decode(workers, "dec_plain", kvp, 6, temperature=0)
    assert "may require TLS" in str(e.value), str(e.value)
    wait_zero_usage(workers, ["dec_plain"])
    wait_zero_usage(workers, ["prefill"], timeout=60)   # released on refusal, or at the lease's end
