"""Every TwiML document the gateway answers with, as pure functions.

Decision in, ``VoiceResponse`` out.  URLs are passed in by the views (built
from the configured public URL, so Twilio signs what we validate).  The one
exception to "built with the twilio library" is :data:`LAST_RESORT`: a constant
document served when even building TwiML failed.

Documents are built with the twilio library and written out by :func:`to_xml`, which
gives exactly the text ``str(response)`` gives (the library's ``ElementTree``
round trip took about a sixth of the interpreter's time on an incoming call; a test
compares the two byte for byte on generated documents and on every builder here).
"""

from __future__ import annotations

import json

from twilio.twiml import TwiML
from twilio.twiml.voice_response import VoiceResponse

from gateway import prompts
from gateway.calls.call_plan import DialEmergency as EmergencyLeg
from gateway.calls.call_plan import HandBack, RingCentre
from gateway.routing import DialCentre
from gateway.whisper import ACCEPT_DIGIT, ACCEPT_PROMPT

__all__ = ["ACCEPT_DIGIT", "LAST_RESORT"]

#: Served when everything else failed (the library itself, a bug in this module): try
#: the international emergency number, then tell the caller to dial it themselves.
LAST_RESORT = (
    '<?xml version="1.0" encoding="UTF-8"?><Response>'
    '<Say language="en-GB">Connecting you to the emergency services.</Say>'
    '<Dial answerOnBridge="true" timeout="30"><Number>112</Number></Dial>'
    '<Say language="en-GB">If you were not connected, please hang up and dial 1 1 2.</Say>'
    "<Hangup/></Response>"
)

#: Served on the agent's leg when its handler failed: a person answered, so bridge.
AGENT_LEG_BRIDGE = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


def to_xml(document: TwiML) -> str:
    """``str(document)``, written directly: the same text as the twilio library's
    ``TwiML.to_xml()`` (sorted attributes, ``true``/``false`` for booleans, ElementTree's
    escaping, `` />`` for an empty element, characters UTF-8 cannot carry as character
    references), without building an ElementTree first."""
    parts = [XML_DECLARATION]
    _write(document, parts)
    text = "".join(parts)
    return text if text.isascii() else text.encode("utf-8", "xmlcharrefreplace").decode("utf-8")


def _write(node: TwiML, parts: list[str]) -> None:
    parts.append("<" + node.name)
    attrs = node.attrs
    for key in sorted(attrs):
        value = attrs[key]
        value = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f' {key}="{_escape_attribute(value)}"')
    text = node.value
    if text and isinstance(text, dict):
        text = json.dumps(text)
    children: list[list[TwiML | str | None]] = []  # [child, its tail]
    for verb in node.verbs:
        if isinstance(verb, str):  # text after the last child is its tail, else the text
            if children:
                children[-1][1] = verb
            else:
                text = verb
        else:
            children.append([verb, None])
    if not text and not children:
        parts.append(" />")
        return
    parts.append(">")
    if text:
        parts.append(_escape_text(text))
    for child, tail in children:
        assert isinstance(child, TwiML)
        _write(child, parts)
        if tail:
            parts.append(_escape_text(tail))
    parts.append(f"</{node.name}>")


#: ElementTree's escaping, in its order ("&" first); str.translate was 20 times slower
_TEXT_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
_ATTRIBUTE_ESCAPES = (*_TEXT_ESCAPES, ('"', "&quot;"), ("\r", "&#13;"), ("\n", "&#10;"),
                      ("\t", "&#09;"))


def _escape_text(text: object) -> str:
    if not isinstance(text, str):  # what ElementTree refuses too
        raise TypeError(f"cannot serialize {text!r} (type {type(text).__name__})")
    return _escaped(text, _TEXT_ESCAPES)


def _escape_attribute(text: str) -> str:
    return _escaped(text, _ATTRIBUTE_ESCAPES)


def _escaped(text: str, escapes: tuple[tuple[str, str], ...]) -> str:
    for char, entity in escapes:
        if char in text:
            text = text.replace(char, entity)
    return text


def _status(status_url: str) -> dict[str, str]:
    return {"status_callback": status_url,
            "status_callback_event": "initiated ringing answered completed",
            "status_callback_method": "POST"}


def ring_centre(step: RingCentre, *, action_url: str, whisper_url: str, status_url: str,
                notices: tuple[str, ...] = ()) -> VoiceResponse:
    """A centre leg of the call plan: say what happens, ring with the planned timeout;
    the agent hears the whisper (and must press the key) before the bridge."""
    language = step.plan.language or None
    response = VoiceResponse()
    for key in (*notices, step.announce):
        text, lang = prompts.say(key, language)
        response.say(text, language=lang)
    dial = response.dial(action=action_url, method="POST", timeout=step.ring_s,
                         answer_on_bridge=True)
    dial.number(step.number, url=whisper_url, method="POST", **_status(status_url))
    return response


def emergency_leg(step: EmergencyLeg, *, action_url: str, status_url: str) -> VoiceResponse:
    """An emergency leg: always an explicit ring timeout and the planned caller ID."""
    response = VoiceResponse()
    text, lang = prompts.say(step.announce, step.plan.language or None)
    response.say(text, language=lang)
    dial = response.dial(action=action_url, method="POST", timeout=step.ring_s,
                         answer_on_bridge=True, caller_id=step.caller_id)
    dial.number(step.number, **_status(status_url))
    return response


def hand_back(step: HandBack, *, car_known: bool) -> VoiceResponse:
    """The car dials the local emergency number itself (it was sent the command); a
    caller we cannot command is asked to dial it."""
    language = step.plan.language or None
    number = prompts.spoken_digits(step.route.emergency_number)
    text, lang = prompts.say("hand_back" if car_known else "give_up", language, number=number)
    response = VoiceResponse()
    response.say(text, language=lang)
    response.hangup()
    return response


def dial_centre(
    decision: DialCentre,
    *,
    action_url: str,
    whisper_url: str,
    status_url: str,
    caller_id: str | None,
    language: str | None,
    first: bool,
    notices: tuple[str, ...] = (),
    announce: str | None = None,
) -> VoiceResponse:
    """Ring the assistance centre; the agent hears the whisper before the bridge.

    ``notices`` are prompt keys said first (e.g. that costs apply)."""
    response = VoiceResponse()
    for key in notices:
        text, lang = prompts.say(key, language)
        response.say(text, language=lang)
    text, lang = prompts.say(announce or ("connecting_centre" if first else "trying_again"),
                             language)
    response.say(text, language=lang)
    dial = response.dial(
        action=action_url,
        method="POST",
        timeout=decision.timeout_s,
        answer_on_bridge=True,
        caller_id=caller_id,
    )
    dial.number(
        decision.number,
        url=whisper_url,
        method="POST",
        status_callback=status_url,
        status_callback_event="initiated ringing answered completed",
        status_callback_method="POST",
    )
    return response


def whisper(summary: str, *, accept_url: str, timeout_s: int, language: str = "en-GB") -> VoiceResponse:
    """Played to the agent only: what happened, then "press 1 to accept".

    A voicemail or an agent who does not press the key is hung up, so the
    caller's ``<Dial>`` ends unbridged and the router moves on.
    """
    response = VoiceResponse()
    gather = response.gather(
        num_digits=1, action=accept_url, method="POST", timeout=timeout_s, action_on_empty_result=False
    )
    gather.say(summary, language=language)
    gather.say(ACCEPT_PROMPT, language=language)
    response.hangup()
    return response


def whisper_result(accepted: bool, *, language: str = "en-GB", details: str = "") -> VoiceResponse:
    """Accepted: the details, then the bridge (the document ends); else hang up the agent."""
    response = VoiceResponse()
    if not accepted:
        response.say("Call not accepted.", language=language)
        response.hangup()
    elif details:
        response.say(details, language=language)
    return response


def say_and_hangup(key: str, *, language: str | None) -> VoiceResponse:
    """Tell the caller something (e.g. a callback was recorded) and end the call."""
    response = VoiceResponse()
    text, lang = prompts.say(key, language)
    response.say(text, language=lang)
    response.hangup()
    return response


def gather(
    keys: tuple[str, ...],
    *,
    action_url: str,
    language: str | None,
    num_digits: int | None = 1,
    finish_on_key: str = "#",
    timeout_s: int = 6,
    no_input_url: str,
    values: dict[str, str] | None = None,
) -> VoiceResponse:
    """Say the prompts inside a DTMF <Gather>; with no input, go to ``no_input_url``.

    Digits come back in the action request's body, never in a URL or in TwiML.
    """
    response = VoiceResponse()
    gathered = response.gather(input="dtmf", action=action_url, method="POST", timeout=timeout_s,
                               num_digits=num_digits, finish_on_key=finish_on_key,
                               action_on_empty_result=False)
    for key in keys:
        text, lang = prompts.say(key, language, **(values or {}))
        gathered.say(text, language=lang)
    response.redirect(no_input_url, method="POST")
    return response


def hangup() -> VoiceResponse:
    response = VoiceResponse()
    response.hangup()
    return response


def empty() -> VoiceResponse:
    return VoiceResponse()
