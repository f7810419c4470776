"""What the gateway says, in the caller's language where we have a translation.

Twilio's ``<Say>`` reads text in the voice of ``language``; text in another
language would be mangled, so a language without a translation here falls back
to British English rather than reading English with a Danish voice.
"""

from __future__ import annotations

FALLBACK_LANGUAGE = "en-GB"

_TEXT: dict[str, dict[str, str]] = {
    "connecting_centre": {
        "en": "Connecting you to the assistance centre. Please stay on the line.",
        "de": "Sie werden mit der Notrufzentrale verbunden. Bitte bleiben Sie in der Leitung.",
        "fr": "Nous vous mettons en relation avec le centre d'assistance. Restez en ligne.",
        "es": "Le estamos conectando con el centro de asistencia. No cuelgue, por favor.",
        "it": "La stiamo collegando con la centrale di assistenza. Resti in linea.",
        "nl": "U wordt doorverbonden met de hulpcentrale. Blijf aan de lijn.",
        "sv": "Vi kopplar dig till assistanscentralen. Stanna kvar i linjen.",
        "da": "Vi forbinder dig med assistancecentralen. Bliv venligst i røret.",
    },
    "trying_again": {
        "en": "The assistance centre did not answer. Trying again.",
        "de": "Die Notrufzentrale hat nicht geantwortet. Wir versuchen es erneut.",
        "fr": "Le centre d'assistance n'a pas répondu. Nouvel essai.",
        "es": "El centro de asistencia no ha contestado. Lo intentamos de nuevo.",
        "it": "La centrale di assistenza non ha risposto. Riproviamo.",
        "nl": "De hulpcentrale nam niet op. We proberen het opnieuw.",
        "sv": "Assistanscentralen svarade inte. Vi försöker igen.",
        "da": "Assistancecentralen svarede ikke. Vi prøver igen.",
    },
    "connecting_emergency": {
        "en": "We could not reach the assistance centre. Connecting you to the emergency services now.",
        "de": "Die Notrufzentrale ist nicht erreichbar. Sie werden jetzt mit dem Notruf verbunden.",
        "fr": "Le centre d'assistance est injoignable. Nous vous passons les services d'urgence.",
        "es": "No hemos podido contactar con el centro de asistencia. Le pasamos con emergencias.",
        "it": "La centrale di assistenza non è raggiungibile. La colleghiamo ai servizi di emergenza.",
        "nl": "De hulpcentrale is niet bereikbaar. U wordt nu doorverbonden met de hulpdiensten.",
        "sv": "Vi når inte assistanscentralen. Vi kopplar dig till larmcentralen nu.",
        "da": "Vi kan ikke nå assistancecentralen. Vi forbinder dig til alarmcentralen nu.",
    },
    "emergency_retry": {
        "en": "The emergency line did not connect. Trying again.",
        "de": "Der Notruf wurde nicht verbunden. Wir versuchen es erneut.",
        "fr": "L'appel d'urgence n'a pas abouti. Nouvel essai.",
        "es": "La llamada de emergencia no se ha conectado. Lo intentamos de nuevo.",
        "it": "La chiamata di emergenza non è riuscita. Riproviamo.",
        "nl": "De noodlijn werd niet verbonden. We proberen het opnieuw.",
        "sv": "Larmsamtalet kopplades inte. Vi försöker igen.",
        "da": "Alarmopkaldet blev ikke forbundet. Vi prøver igen.",
    },
    "give_up": {
        "en": "We could not connect your call. Please hang up and dial {number} directly.",
        "de": "Wir konnten Ihren Anruf nicht verbinden. Bitte legen Sie auf und wählen Sie {number}.",
        "fr": "Nous n'avons pas pu vous connecter. Raccrochez et composez le {number}.",
        "es": "No hemos podido conectar su llamada. Cuelgue y marque el {number}.",
        "it": "Non siamo riusciti a collegarla. Riagganci e componga il {number}.",
        "nl": "We konden u niet doorverbinden. Hang op en bel {number}.",
        "sv": "Vi kunde inte koppla samtalet. Lägg på och ring {number}.",
        "da": "Vi kunne ikke forbinde opkaldet. Læg på og ring {number}.",
    },
}


def say(key: str, language: str | None, **values: str) -> tuple[str, str]:
    """``(text, language)`` for ``<Say>``: the caller's language or British English."""
    table = _TEXT[key]
    lang = (language or FALLBACK_LANGUAGE).split("-")[0].lower()
    if lang in table:
        return table[lang].format(**values), language or FALLBACK_LANGUAGE
    return table["en"].format(**values), FALLBACK_LANGUAGE


def spoken_digits(number: str) -> str:
    """'112' -> '1 1 2', so ``<Say>`` reads digits, not 'one hundred and twelve'."""
    return " ".join(ch for ch in number if ch.isdigit())
