"""The real tritonclient against `adalora serve`, run under .venv-triton's Python (tritonclient[grpc] needs
protobuf < 7, our stubs 7): tests/test_kserve_triton.py starts it with a JSON plan on stdin and reads one JSON
object of results from stdout.

Plan: {"target": "host:port", "prompts": [...], "models": [...], "max_tokens": N, "stream_model": id,
       "admin_token": str, "load": id}
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def inputs(prompt: str, max_tokens: int, stream: bool | None = None) -> list:
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tokens = triton.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    temperature = triton.InferInput("temperature", [1], "FP32")
    temperature.set_data_from_numpy(np.array([0.0], dtype=np.float32))
    out = [text, tokens, temperature]
    if stream is not None:
        flag = triton.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([stream], dtype=bool))
        out.append(flag)
    return out


def error_of(call) -> str:
    try:
        call()
    except InferenceServerException as e:
        return f"{e.status()} {e.message()}"
    return "no error"


def main() -> None:
    plan = json.load(sys.stdin)
    client = triton.InferenceServerClient(url=plan["target"])
    out: dict = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                 "model_ready": {m: client.is_model_ready(m) for m in plan["models"]},
                 "server_metadata": client.get_server_metadata(as_json=True),
                 "model_metadata": client.get_model_metadata(plan["models"][0], as_json=True)}
    # every (model, prompt) at once: async_infer, results by request id
    done: queue.Queue = queue.Queue()
    cases = [(m, p) for m in plan["models"] for p in plan["prompts"]]
    for i, (model, prompt) in enumerate(cases):  # tritonclient calls callback(result=..., error=...)
        client.async_infer(model, inputs(prompt, plan["max_tokens"]), request_id=str(i),
                           callback=lambda result, error: done.put((result, error)),
                           outputs=[triton.InferRequestedOutput("text_output")])
    texts = {}
    for _ in cases:
        result, error = done.get(timeout=120)
        if error is not None:
            raise error
        texts[result.get_response().id] = result.as_numpy("text_output")[0].decode()
    out["infer"] = [[m, p, texts[str(i)]] for i, (m, p) in enumerate(cases)]
    # a decoupled stream: one response per chunk, the last flagged final
    chunks: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: chunks.put((result, error)))
    client.async_stream_infer(plan["stream_model"], inputs(plan["prompts"][0], plan["max_tokens"], stream=True),
                              request_id="s")
    streamed, final = [], False
    while not final:
        result, error = chunks.get(timeout=120)
        if error is not None:
            raise error
        streamed.append(result.as_numpy("text_output")[0].decode())
        final = result.get_response().parameters["triton_final_response"].bool_param
    client.stop_stream()
    out["stream"] = streamed
    out["index"] = client.get_model_repository_index(as_json=True)
    out["load_without_token"] = error_of(lambda: client.load_model(plan["load"]))
    client.load_model(plan["load"], headers={"authorization": f"Bearer {plan['admin_token']}"})
    out["loaded_ready"] = client.is_model_ready(plan["load"])
    client.unload_model(plan["load"], headers={"authorization": f"Bearer {plan['admin_token']}"})
    out["unloaded_ready"] = client.is_model_ready(plan["load"])
    out["unknown_model"] = error_of(lambda: client.infer("nope", inputs("w5", 2)))
    out["unknown_metadata"] = error_of(lambda: client.get_model_metadata("nope"))
    client.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
