"""The stub's usage as the real ``openai`` SDK reads it, from the ``regiongate stub`` process, and its
switches ``--ignore-stream-options`` and ``--no-usage`` (three process starts in all)."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.responses import Response

from gateway.stub import prompt_tokens
from support.processes import run_stub

pytestmark = pytest.mark.e2e

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count the tokens in this sentence, please."}]
PROMPT = prompt_tokens({"messages": MESSAGES})


def asking_for_usage(sdk: openai.OpenAI) -> list[ChatCompletionChunk]:
    """A chat stream's chunks, asked with ``stream_options.include_usage``."""
    stream = sdk.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    return list(stream)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="test", max_retries=0)


def test_the_sdk_reads_the_stubs_usage_in_every_shape() -> None:
    with run_stub() as stub:
        sdk = client(stub.url)
        whole = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
        assert whole.usage is not None
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (PROMPT, 5)
        assert whole.choices[0].finish_reason == "length"

        chunks = asking_for_usage(sdk)
        assert all(c.usage is None for c in chunks[:-1])
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT, 13)
        plain = list(sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True))
        assert all(c.usage is None and c.choices for c in plain)

        response = sdk.responses.create(model="m", input="Hello there", max_output_tokens=4)
        assert response.usage is not None and response.output_text == "Hello from the Regiongate"
        usage = response.usage
        assert (usage.input_tokens, usage.output_tokens) == (prompt_tokens({"input": "Hello there"}), 4)

        async def streamed() -> list[str]:
            async_sdk = openai.AsyncOpenAI(base_url=stub.url + "/v1", api_key="test", max_retries=0)
            kinds: list[str] = []
            completed: Response | None = None
            async for event in await async_sdk.responses.create(model="m", input="Hello there", stream=True):
                kinds.append(event.type)
                if event.type == "response.completed":
                    completed = event.response
            assert completed is not None and completed.usage is not None
            assert completed.usage.output_tokens == 13
            await async_sdk.close()
            return kinds

        kinds = asyncio.run(streamed())
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert kinds.count("response.output_text.delta") == 13


@pytest.mark.parametrize("switch", ["--ignore-stream-options", "--no-usage"])
def test_the_switches(switch: str) -> None:
    with run_stub(switch) as stub:
        sdk = client(stub.url)
        chunks = asking_for_usage(sdk)
        assert chunks and all(c.usage is None and c.choices for c in chunks)
        whole = sdk.chat.completions.create(model="m", messages=MESSAGES)
        assert (whole.usage is None) == (switch == "--no-usage")
