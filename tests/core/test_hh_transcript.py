"""HH-RLHF transcripts: turns found, quoted markers kept as text, malformed ones refused."""

import pytest

from core.hh_transcript import looks_like_transcript, messages_prompt, transcript_prompt, transcript_turns


def roles_and_texts(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_multi_turn_transcript_is_cut_before_the_last_answer():
    text = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out.\n\nAssistant: Call a locksmith."
    messages, reason = transcript_prompt(text, "chosen")
    assert reason == ""
    assert roles_and_texts(messages) == [("user", "How do I pick a lock?"), ("assistant", "Why?"),
                                         ("user", "I'm locked out.")]


def test_prompt_form_with_an_empty_last_answer_and_paragraphs_inside_turns():
    text = "Human: First paragraph.\n\nSecond paragraph.\n\nAssistant:"
    messages, _ = transcript_prompt(text, "prompt")
    assert roles_and_texts(messages) == [("user", "First paragraph.\n\nSecond paragraph.")]


@pytest.mark.parametrize("quote", ['"{}"', "“{}”"])
def test_a_quoted_marker_stays_in_its_turn(quote):
    quoted = quote.format("\n\nHuman: hi there\n\nAssistant: hello")
    text = (f"\n\nHuman: What does this log mean? {quoted} is all it says.\n\nAssistant: A chat transcript."
            f"\n\nHuman: And {quote.format(chr(10) * 2 + 'Human: x')}?\n\nAssistant: A quote.")
    messages, reason = transcript_prompt(text, "chosen")
    assert reason == ""
    assert roles_and_texts(messages) == [
        ("user", f"What does this log mean? {quoted} is all it says."),
        ("assistant", "A chat transcript."),
        ("user", f"And {quote.format(chr(10) * 2 + 'Human: x')}?"),
    ]


def test_a_marker_quoted_by_the_assistant_stays_in_the_answer():
    text = ('\n\nHuman: Show me the format.\n\nAssistant: Each turn starts like "\n\nHuman: your words" and '
            "then the reply.\n\nHuman: Thanks.\n\nAssistant: You're welcome.")
    turns = transcript_turns(text)
    assert [role for role, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert '"\n\nHuman: your words"' in turns[1][1]


def test_a_stray_quote_does_not_swallow_the_turns_after_it():
    text = '\n\nHuman: I am 5\'11" tall.\n\nAssistant: Noted.\n\nHuman: Am I tall?\n\nAssistant: Fairly.'
    messages, _ = transcript_prompt(text, "chosen")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]


def test_a_speaker_repeated_is_one_turn():
    messages, _ = transcript_prompt("\n\nHuman: one\n\nHuman: two\n\nAssistant: ok", "chosen")
    assert roles_and_texts(messages) == [("user", "one\n\nHuman: two")]


@pytest.mark.parametrize("text, reason", [
    ("Assistant: I start.", "'chosen' does not start with a 'Human:' turn (starts with 'Assistant: I start.')"),
    ("Hello there", "'chosen' does not start with a 'Human:' turn (starts with 'Hello there')"),
    ("\n\nHuman: only a question", "'chosen' has no 'Assistant:' turn to cut"),
    ("\n\nHuman: q\n\nAssistant: a\n\nHuman: q2", "'chosen' ends with a Human turn, not an answer to cut"),
    ("\n\nHuman:   \n\nAssistant: a", "'chosen' turn 1 (user) is empty"),
    ("\n\nHuman: q\n\nAssistant:\n\nHuman: q2\n\nAssistant: a", "'chosen' turn 2 (assistant) is empty"),
])
def test_malformed_transcripts_are_refused_with_a_reason_naming_the_column(text, reason):
    assert transcript_prompt(text, "chosen") == (None, reason)


def test_looks_like_transcript():
    assert looks_like_transcript("\n\nHuman: hi")
    assert looks_like_transcript("Human: hi")
    assert not looks_like_transcript("What is Human: about?")


def test_chat_lists_are_cut_before_the_last_answer():
    chat = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    assert messages_prompt(chat, "chosen") == (chat[:1], "")
    assert messages_prompt(chat[:1], "chosen")[1] == "'chosen' must end with the assistant's answer to cut, not a user turn"
    assert messages_prompt(chat[1:], "chosen")[1] == "'chosen' has no user turn before its last answer"
