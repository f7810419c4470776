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
    "hand_back": {
        "en": "The car will now call the emergency number {number} itself. Please stay in the car and keep the line free.",
        "de": "Das Fahrzeug ruft jetzt selbst den Notruf {number} an. Bitte bleiben Sie im Fahrzeug und halten Sie die Leitung frei.",
        "fr": "La voiture va maintenant appeler elle-même le {number}. Restez dans la voiture et laissez la ligne libre.",
        "es": "El coche llamará ahora por sí mismo al {number}. Permanezca en el coche y deje la línea libre.",
        "it": "L'auto chiamerà ora da sola il {number}. Resti nell'auto e lasci la linea libera.",
        "nl": "De auto belt nu zelf het alarmnummer {number}. Blijf in de auto en houd de lijn vrij.",
        "sv": "Bilen ringer nu själv larmnumret {number}. Stanna i bilen och håll linjen fri.",
        "da": "Bilen ringer nu selv til alarmnummeret {number}. Bliv i bilen og hold linjen fri.",
    },
    "test_call_end": {
        "en": "This test call was received. Thank you. Goodbye.",
        "de": "Dieser Testanruf ist eingegangen. Vielen Dank. Auf Wiederhören.",
        "fr": "Cet appel de test a bien été reçu. Merci. Au revoir.",
        "es": "Hemos recibido esta llamada de prueba. Gracias. Adiós.",
        "it": "Questa chiamata di prova è stata ricevuta. Grazie. Arrivederci.",
        "nl": "Deze testoproep is ontvangen. Dank u. Tot ziens.",
        "sv": "Testsamtalet har tagits emot. Tack. Hej då.",
        "da": "Testopkaldet er modtaget. Tak. Farvel.",
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
    "ivr_menu": {
        "en": "Welcome to vehicle assistance. For roadside assistance, press 1. To unlock your "
              "car, press 2. To report your car stolen, press 3. To reactivate an immobilised "
              "car, press 4. To speak to an agent, press 0.",
        "de": "Willkommen bei der Fahrzeugassistenz. Für Pannenhilfe drücken Sie 1. Um Ihr Auto "
              "zu entriegeln, drücken Sie 2. Um einen Diebstahl zu melden, drücken Sie 3. Um ein "
              "stillgelegtes Auto wieder freizuschalten, drücken Sie 4. Für einen Mitarbeiter "
              "drücken Sie 0.",
        "sv": "Välkommen till fordonsassistans. För vägassistans, tryck 1. För att låsa upp "
              "bilen, tryck 2. För att anmäla bilen stulen, tryck 3. För att återaktivera en "
              "spärrad bil, tryck 4. För att tala med en handläggare, tryck 0.",
        "fr": "Bienvenue à l'assistance véhicule. Pour le dépannage, tapez 1. Pour déverrouiller "
              "votre voiture, tapez 2. Pour déclarer un vol, tapez 3. Pour réactiver une voiture "
              "immobilisée, tapez 4. Pour parler à un conseiller, tapez 0.",
    },
    "ivr_invalid": {
        "en": "Sorry, that is not one of the options.",
        "de": "Diese Auswahl gibt es leider nicht.",
        "sv": "Det valet finns tyvärr inte.",
        "fr": "Désolé, ce choix n'existe pas.",
    },
    "ivr_identify": {
        "en": "Please enter your eight digit customer number.",
        "de": "Bitte geben Sie Ihre achtstellige Kundennummer ein.",
        "sv": "Ange ditt åttasiffriga kundnummer.",
        "fr": "Veuillez saisir votre numéro client à huit chiffres.",
    },
    "ivr_unknown_vehicle": {
        "en": "We could not find a car with that number.",
        "de": "Zu dieser Nummer haben wir kein Fahrzeug gefunden.",
        "sv": "Vi hittade ingen bil med det numret.",
        "fr": "Nous n'avons trouvé aucun véhicule avec ce numéro.",
    },
    "ivr_pin": {
        "en": "Please enter your PIN, followed by the hash key.",
        "de": "Bitte geben Sie Ihre PIN ein und drücken Sie die Rautetaste.",
        "sv": "Ange din PIN-kod följd av fyrkant.",
        "fr": "Veuillez saisir votre code PIN, suivi de la touche dièse.",
    },
    "ivr_pin_wrong": {
        "en": "That PIN is not correct.",
        "de": "Diese PIN ist nicht korrekt.",
        "sv": "PIN-koden är inte korrekt.",
        "fr": "Ce code PIN n'est pas correct.",
    },
    "ivr_pin_locked": {
        "en": "For your security, PIN entry for this car is locked for fifteen minutes. "
              "Connecting you to an agent.",
        "de": "Zu Ihrer Sicherheit ist die PIN-Eingabe für dieses Fahrzeug fünfzehn Minuten "
              "gesperrt. Sie werden mit einem Mitarbeiter verbunden.",
        "sv": "För din säkerhet är PIN-inmatningen för bilen spärrad i femton minuter. "
              "Vi kopplar dig till en handläggare.",
        "fr": "Pour votre sécurité, la saisie du code PIN est bloquée pendant quinze minutes. "
              "Nous vous passons un conseiller.",
    },
    "ivr_unlocked": {
        "en": "Your car is unlocked. Press the door handle within {seconds} seconds, "
              "or the car will lock again.",
        "de": "Ihr Auto ist entriegelt. Betätigen Sie den Türgriff innerhalb von {seconds} "
              "Sekunden, sonst verriegelt es wieder.",
        "sv": "Bilen är upplåst. Tryck på dörrhandtaget inom {seconds} sekunder, annars låses "
              "bilen igen.",
        "fr": "Votre voiture est déverrouillée. Actionnez la poignée dans les {seconds} "
              "secondes, sinon elle se verrouillera.",
    },
    "ivr_car_unreachable": {
        "en": "We could not reach your car right now; it may have poor signal. "
              "Connecting you to an agent.",
        "de": "Ihr Auto ist gerade nicht erreichbar, vielleicht wegen schlechten Empfangs. "
              "Sie werden mit einem Mitarbeiter verbunden.",
        "sv": "Vi når inte bilen just nu, den kan ha dålig täckning. Vi kopplar dig till en "
              "handläggare.",
        "fr": "Nous ne pouvons pas joindre votre voiture, le réseau est peut-être faible. "
              "Nous vous passons un conseiller.",
    },
    "ivr_reactivated": {
        "en": "Your car is reactivated. You can start it again.",
        "de": "Ihr Auto ist wieder freigeschaltet. Sie können es wieder starten.",
        "sv": "Bilen är återaktiverad. Du kan starta den igen.",
        "fr": "Votre voiture est réactivée. Vous pouvez la redémarrer.",
    },
    "ivr_unlock_sent": {
        "en": "Your car has been sent the unlock command. When it unlocks, press the door "
              "handle within {seconds} seconds, or the car will lock again.",
        "de": "Der Entriegelungsbefehl ist an Ihr Auto unterwegs. Sobald es entriegelt ist, "
              "betätigen Sie den Türgriff innerhalb von {seconds} Sekunden, sonst "
              "verriegelt es wieder.",
        "sv": "Upplåsningen är skickad till bilen. När den låses upp, tryck på "
              "dörrhandtaget inom {seconds} sekunder, annars låses bilen igen.",
        "fr": "La commande de déverrouillage a été envoyée à votre voiture. Dès qu'elle est "
              "déverrouillée, actionnez la poignée dans les {seconds} secondes, sinon elle "
              "se verrouillera.",
    },
    "ivr_reactivation_sent": {
        # the car may never report (out of coverage): after GATEWAY_COMMAND_CONFIRM_S the
        # command fails, and calling again is what sends it again
        "en": "Your car has been sent the reactivation. It is reactivated as soon as the "
              "car confirms it. If it is still immobilised in a few minutes, please call "
              "again.",
        "de": "Die Freischaltung ist an Ihr Auto unterwegs. Es ist freigeschaltet, sobald "
              "das Auto sie bestätigt. Ist es in einigen Minuten noch stillgelegt, rufen "
              "Sie bitte noch einmal an.",
        "sv": "Återaktiveringen är skickad till bilen. Den är återaktiverad så snart bilen "
              "bekräftar det. Om bilen fortfarande är spärrad om några minuter, ring igen.",
        "fr": "La réactivation a été envoyée à votre voiture. Elle sera réactivée dès que "
              "la voiture le confirme. Si elle est encore immobilisée dans quelques "
              "minutes, veuillez rappeler.",
    },
    "ivr_not_immobilised": {
        "en": "Your car is not immobilised.",
        "de": "Ihr Auto ist nicht stillgelegt.",
        "sv": "Bilen är inte spärrad.",
        "fr": "Votre voiture n'est pas immobilisée.",
    },
    "ivr_costs_apply": {
        "en": "Please note: your roadside assistance cover has ended, so costs apply for this "
              "service. Connecting you now.",
        "de": "Bitte beachten Sie: Ihre Pannenhilfe ist abgelaufen, für diesen Einsatz fallen "
              "Kosten an. Sie werden jetzt verbunden.",
        "sv": "Observera: din vägassistans har upphört, så tjänsten kostar. Vi kopplar dig nu.",
        "fr": "Attention : votre assistance dépannage a expiré, ce service est payant. "
              "Nous vous mettons en relation.",
    },
    "ivr_agent": {
        "en": "Connecting you to an agent.",
        "de": "Sie werden mit einem Mitarbeiter verbunden.",
        "sv": "Vi kopplar dig till en handläggare.",
        "fr": "Nous vous passons un conseiller.",
    },
    "callback": {
        "en": "The assistance centre cannot take your call right now. We have recorded a "
              "callback request and an agent will call you back on this number. If this is an "
              "emergency, hang up and press the S O S button in your car.",
        "de": "Die Assistenzzentrale ist gerade nicht erreichbar. Wir haben einen Rückruf "
              "notiert. Im Notfall legen Sie auf und drücken Sie die S O S Taste im Auto.",
        "sv": "Assistanscentralen kan inte ta ditt samtal just nu. Vi har registrerat en "
              "begäran om återuppringning. Vid en nödsituation, lägg på och tryck på S O S "
              "knappen i bilen.",
        "fr": "Le centre d'assistance ne peut pas prendre votre appel. Nous avons noté une "
              "demande de rappel. En cas d'urgence, raccrochez et appuyez sur le bouton S O S "
              "de votre voiture.",
    },
    "goodbye": {
        "en": "Thank you for calling. Goodbye.",
        "de": "Vielen Dank für Ihren Anruf. Auf Wiederhören.",
        "sv": "Tack för ditt samtal. Hej då.",
        "fr": "Merci de votre appel. Au revoir.",
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
