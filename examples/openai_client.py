"""The official ``openai`` client against ``ksdk serve`` (start it first: ``ksdk serve`` or examples/serve.py).

    python examples/openai_client.py [BASE_URL]     # default http://127.0.0.1:8000/v1; key from $KSDK_API_KEY
"""

from __future__ import annotations

import os
import sys

import openai


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("KSDK_API_KEY", "none"))
    model = client.models.list().data[0].id  # the id the server serves; any other is a 404
    print(f"model: {model}")

    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is MLA?"}],
        max_tokens=64, temperature=0.6, seed=1,
    )
    message = reply.choices[0].message
    print("reasoning:", (message.model_extra or {}).get("reasoning_content", ""))  # R1's <think> text
    print("answer:", message.content)
    print("finish_reason:", reply.choices[0].finish_reason, "usage:", reply.usage)

    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=32, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage is not None:  # the last chunk: no choices, the usage of the whole request
            print(f"\nusage: {chunk.usage}")

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, logprobs=2)
    print("completion:", repr(completion.choices[0].text), completion.choices[0].logprobs.top_logprobs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
