"""Ask a running `llava-edge serve` about a picture and get an answer that parses as JSON.

With no --image, a scene of the built-in tiny LLaVA's task is drawn (and saved as scene.png, to upload in the
kiosk page too). The request is a plain OpenAI chat completion with `response_format` = a JSON schema: the
server constrains decoding to the schema, so the answer always parses; whether it is right is the model's.

    llava-edge serve &                      # the built-in model
    python3 examples/ask_json.py            # {"answer": "..."} for a few questions, beside the truth
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from openai import OpenAI

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 address")
    ap.add_argument("--api-key", default=os.environ.get("LLAVA_EDGE_API_KEY", "none"),
                    help="the server's --api-key (default: $LLAVA_EDGE_API_KEY, else none)")
    ap.add_argument("--image", type=Path, default=None, help="a picture (default: draw a scene as scene.png)")
    ap.add_argument("--question", action="append", default=None,
                    help="ask this (repeatable; default: the scene's own questions)")
    a = ap.parse_args(argv)
    truth: dict[str, str] = {}
    if a.image is None:
        from llava_edge.synthetic.data import JSON_SUFFIX, generate_sample
        from llava_edge.synthetic.evaluate import DEMO_SEED

        sample = generate_sample(DEMO_SEED, 0)
        a.image = Path("scene.png")
        sample.image.save(a.image)
        truth = {t.question + JSON_SUFFIX: t.answer for t in sample.turns}
        print(f"drew {a.image}: {sample.caption}")
    questions = a.question or list(truth)[:4] or ["what is in the image? answer in json."]
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for q in questions:
        r = client.chat.completions.create(
            model="llava-edge", temperature=0, max_tokens=32, response_format=fmt,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a.image)}},
                                                   {"type": "text", "text": q}]}])
        answer = json.loads(r.choices[0].message.content)  # parses: the schema constrained the decoding
        right = f"   (truth: {truth[q]})" if q in truth else ""
        print(f"{q}\n  -> {json.dumps(answer)}{right}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
