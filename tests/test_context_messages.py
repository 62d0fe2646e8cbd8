"""A prompt too long for the context: the error tells its reader what they can change (a CLI
flag, or only the prompt for a server's clients) and never to raise a limit already at its
maximum."""

import pytest

from app_support import import_app
from kimivl_local.engine.generate import Engine
from kimivl_local.errors import ContextLengthError


@pytest.fixture
def engine_of(tiny_model_fp32):
    def make(max_context, **kwargs):
        return Engine(tiny_model_fp32.model, max_context, **kwargs)
    return make


def test_cli_reader_is_told_the_flag_and_its_ceiling(engine_of):
    with pytest.raises(ContextLengthError) as err:
        engine_of(64).check_fits(100)
    assert str(err.value) == ("the prompt is 100 tokens but the context holds 64 (including at "
                              "least one token to generate); shorten it or raise --max-context "
                              "(up to 8192)")


def test_no_advice_to_raise_a_limit_at_its_maximum(engine_of):
    message = engine_of(8192).overflow_message(9000)  # the tiny model's maximum
    assert "raise" not in message and "8192 is the model's maximum" in message


def test_server_clients_get_the_servers_limit_not_a_flag(tiny_model_fp32, engine_of):
    message = engine_of(64, context_setting=None).overflow_message(100)
    assert "this server's context holds 64 tokens" in message
    assert "--" not in message and "shorten the prompt or the conversation" in message

    app = import_app("server").build_app(tiny_model_fp32)
    try:
        with pytest.raises(ContextLengthError, match="this server's context holds"):
            tiny_model_fp32.engine.check_fits(10**6)
    finally:
        app.state.generation_queue.close()
        tiny_model_fp32.engine.context_setting = "--max-context"
