"""gateway.twiml.to_xml writes exactly what the twilio library's str(document) writes."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.twiml import GenericNode, TwiML
from twilio.twiml.voice_response import VoiceResponse

from gateway import twiml
from gateway.calls.call_plan import Arrival, DialEmergency, HandBack, RingCentre, Step, start
from gateway.calls.inbound import EMERGENCY
from gateway.config import VoicePolicy
from gateway.plan import NumberPlan

# text a caller or a URL could carry: XML specials, whitespace escaped in attributes,
# non-ASCII, and characters UTF-8 cannot carry (lone surrogates)
TEXT = st.text(alphabet=st.sampled_from(
    list("aZ09 &<>\"'\r\n\t=;/?:#%+") + ["é", "ß", "日", "\u2028", "\ud800", "\x00", "\U0001f697"]),
    max_size=12)
NAME = st.sampled_from(["Say", "Dial", "Number", "Gather", "Pause", "Hangup", "Redirect"])
ATTR_NAME = st.sampled_from(["action", "method", "timeout", "url", "language", "callerId",
                             "answerOnBridge", "xml:lang", "numDigits"])
ATTR_VALUE = st.one_of(TEXT, st.booleans(), st.integers(-5, 100), st.floats(0, 10))


@st.composite
def documents(draw: st.DrawFn, depth: int = 0) -> TwiML:
    node = GenericNode(draw(NAME), draw(st.one_of(st.none(), TEXT, st.just(""),
                                                  st.dictionaries(TEXT, TEXT, max_size=2))))
    node.attrs.update(draw(st.dictionaries(ATTR_NAME, ATTR_VALUE, max_size=4)))
    if depth < 3:
        for verb in draw(st.lists(st.one_of(TEXT, documents(depth=depth + 1)), max_size=4)):
            node.nest(verb)
    return node


@settings(max_examples=400, deadline=None)
@given(documents())
def test_generated_documents_serialise_as_the_library_does(document: TwiML) -> None:
    ours = twiml.to_xml(document)
    assert ours == str(copy.deepcopy(document))


def test_non_text_content_is_refused_as_the_library_refuses_it() -> None:
    document = GenericNode("Say", 5)
    try:
        str(copy.deepcopy(document))
    except TypeError:
        pass
    else:  # pragma: no cover - the library changed: our writer must follow it
        raise AssertionError("the library now serialises a number as text")
    try:
        twiml.to_xml(document)
    except TypeError:
        return
    raise AssertionError("to_xml wrote a number as text")


T0 = 1_700_000_000.0
GB_ID = {"GB": "+442079460555"}


def _steps(plan: NumberPlan) -> list[Step]:
    """Real steps of the call plan: a centre leg, an emergency leg, both hand-backs."""
    everything_down = frozenset(c.centre_id for c in plan.centres)

    def first(home: str, where: str, down: frozenset[str]) -> Step:
        return start(Arrival(service=EMERGENCY, now=T0, home=home, where=where,
                             where_reason="test", caller_sid="CA1", down=down,
                             language="sv-SE"),
                     plan=plan, policy=VoicePolicy(), caller_ids=GB_ID)

    return [first("SE", "GB", frozenset()), first("GB", "GB", everything_down),
            first("SE", "DK", everything_down)]


def test_every_builder_serialises_as_the_library_does(plan: NumberPlan) -> None:
    ring, emergency, hand_back = _steps(plan)
    assert isinstance(ring, RingCentre) and isinstance(emergency, DialEmergency)
    assert isinstance(hand_back, HandBack)
    documents: list[VoiceResponse] = [
        twiml.ring_centre(ring, action_url="https://gw.example/a?x=1&y=2",
                          whisper_url="https://w", status_url="https://s",
                          notices=("ivr_costs_apply",)),
        twiml.emergency_leg(emergency, action_url="https://gw.example/e?k=1",
                            status_url="https://s"),
        twiml.hand_back(hand_back, car_known=True),
        twiml.hand_back(hand_back, car_known=False),
        twiml.whisper('Crash, airbags "fired" <SE> & more', accept_url="https://a?b=1&c=2",
                      timeout_s=8),
        twiml.whisper_result(True, details="VIN & more"),
        twiml.whisper_result(False),
        twiml.say_and_hangup("callback", language="fr-FR"),
        twiml.gather(("ivr_pin",), action_url="https://a", language="sv-SE",
                     num_digits=None, no_input_url="https://n"),
        twiml.hangup(),
        twiml.empty(),
    ]
    for document in documents:
        assert twiml.to_xml(document) == str(document)
