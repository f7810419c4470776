"""What the owner reads about a theft alarm: SMS and app push texts, in the owner's language.

The language is the vehicle's own ``language`` (its primary subtag: ``de-AT`` is
German) when we have texts for it, else the usual language of its market, else
English.  Texts exist for English, German, Swedish, French, Dutch, Danish and
Norwegian (``no``/``nn`` read as Bokmål).

Every SMS carries a *reference*: eight characters derived from the notification's
idempotency key.  It is what the notifier looks for in Twilio's message list before
it sends an SMS again after an attempt that may have gone through
(:mod:`gateway.notify`), and it lets the owner quote the alarm to an agent.  No
text carries a secret: only the last six characters of the VIN, the time, the
reference.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass

FALLBACK = "en"

#: the language of the owner texts when the vehicle names none we have, by market
MARKET_LANGUAGE: dict[str, str] = {
    "DE": "de", "AT": "de", "CH": "de", "LI": "de",
    "SE": "sv", "AX": "sv",
    "FR": "fr", "MC": "fr", "LU": "fr",
    "NL": "nl", "BE": "nl",
    "DK": "da", "FO": "da", "GL": "da",
    "NO": "nb", "SJ": "nb",
}

#: language subtags read as another one we have texts for
_ALIASES = {"no": "nb", "nn": "nb"}

_SMS: dict[str, str] = {
    "en": "Theft alarm on your car (VIN ending {vin}) at {at}. If this was not you, "
          "call the assistance centre. Ref {ref}",
    "de": "Diebstahlalarm an Ihrem Fahrzeug (FIN endet auf {vin}) um {at}. Wenn Sie das "
          "nicht waren, rufen Sie die Assistance-Zentrale an. Ref. {ref}",
    "sv": "Stöldlarm i din bil (VIN slutar på {vin}) kl. {at}. Om det inte var du, "
          "ring assistanscentralen. Ref {ref}",
    "fr": "Alarme antivol sur votre voiture (VIN se terminant par {vin}) à {at}. Si ce "
          "n'était pas vous, appelez le centre d'assistance. Réf. {ref}",
    "nl": "Diefstalalarm op uw auto (VIN eindigend op {vin}) om {at}. Was u dit niet, "
          "bel dan de hulpcentrale. Ref. {ref}",
    "da": "Tyverialarm i din bil (VIN slutter med {vin}) kl. {at}. Hvis det ikke var dig, "
          "så ring til assistancecentralen. Ref. {ref}",
    "nb": "Tyverialarm i bilen din (VIN slutter på {vin}) kl. {at}. Hvis det ikke var deg, "
          "ring assistansesentralen. Ref. {ref}",
}

_PUSH_TITLE: dict[str, str] = {
    "en": "Vehicle alarm",
    "de": "Fahrzeugalarm",
    "sv": "Billarm",
    "fr": "Alarme du véhicule",
    "nl": "Autoalarm",
    "da": "Bilalarm",
    "nb": "Bilalarm",
}

_PUSH_BODY: dict[str, str] = {
    "en": "Theft alarm on your car at {at}. Open the app to see where it is.",
    "de": "Diebstahlalarm an Ihrem Fahrzeug um {at}. Öffnen Sie die App, um zu sehen, "
          "wo es steht.",
    "sv": "Stöldlarm i din bil kl. {at}. Öppna appen för att se var den är.",
    "fr": "Alarme antivol sur votre voiture à {at}. Ouvrez l'application pour voir où "
          "elle se trouve.",
    "nl": "Diefstalalarm op uw auto om {at}. Open de app om te zien waar hij staat.",
    "da": "Tyverialarm i din bil kl. {at}. Åbn appen for at se, hvor den er.",
    "nb": "Tyverialarm i bilen din kl. {at}. Åpne appen for å se hvor den er.",
}

LANGUAGES = frozenset(_SMS)


@dataclass(frozen=True)
class OwnerTexts:
    language: str
    sms: str
    push_title: str
    push_body: str


def owner_language(language: str | None, market: str | None) -> str:
    """The language of the owner texts: the vehicle's, else its market's, else English."""
    if language:
        primary = language.strip().replace("_", "-").split("-")[0].lower()
        primary = _ALIASES.get(primary, primary)
        if primary in LANGUAGES:
            return primary
    if market:
        return MARKET_LANGUAGE.get(market.strip().upper(), FALLBACK)
    return FALLBACK


def reference(idempotency_key: str) -> str:
    """Eight upper-case characters (A-Z, 2-7) derived from the notification's key."""
    digest = hashlib.sha256(idempotency_key.encode()).digest()
    return base64.b32encode(digest[:5]).decode()


def _at(occurred_at: dt.datetime) -> str:
    return occurred_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def owner_texts(*, vin: str, occurred_at: dt.datetime, language: str | None, market: str | None,
                sms_key: str) -> OwnerTexts:
    """The SMS (with the reference of ``sms_key``) and the push, in the owner's language."""
    lang = owner_language(language, market)
    at = _at(occurred_at)
    return OwnerTexts(
        language=lang,
        sms=_SMS[lang].format(vin=vin[-6:], at=at, ref=reference(sms_key)),
        push_title=_PUSH_TITLE[lang],
        push_body=_PUSH_BODY[lang].format(at=at),
    )


def agent_text(*, vin: str, occurred_at: dt.datetime) -> str:
    """The escalation's summary for the centre's agents (English, the centre's language)."""
    return (f"Theft alarm on VIN {vin} at {_at(occurred_at)}: not disarmed with the key. "
            "Call the owner to confirm.")
