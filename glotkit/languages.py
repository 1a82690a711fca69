"""Language codes in recipes: ISO 639 codes (``ro``, ``ron``, ``ro-RO``), or a common English name
mapped to its code.  A language decides real behaviour (Romanian letter fixes, English articles in
EM/F1), so a name glotkit does not know is refused rather than silently treated as 'no language'."""

from __future__ import annotations

import re

# common English (and own) names -> ISO 639-1 code
NAMES = {
    "romanian": "ro", "română": "ro", "romana": "ro", "moldovan": "ro", "english": "en", "german": "de",
    "deutsch": "de", "french": "fr", "français": "fr", "francais": "fr", "italian": "it", "spanish": "es",
    "portuguese": "pt", "dutch": "nl", "polish": "pl", "czech": "cs", "slovak": "sk", "slovenian": "sl",
    "hungarian": "hu", "bulgarian": "bg", "greek": "el", "turkish": "tr", "russian": "ru", "ukrainian": "uk",
    "serbian": "sr", "croatian": "hr", "bosnian": "bs", "albanian": "sq", "macedonian": "mk",
    "lithuanian": "lt", "latvian": "lv", "estonian": "et", "finnish": "fi", "swedish": "sv", "danish": "da",
    "norwegian": "no", "icelandic": "is", "irish": "ga", "welsh": "cy", "basque": "eu", "catalan": "ca",
    "galician": "gl", "maltese": "mt", "luxembourgish": "lb", "arabic": "ar", "hebrew": "he", "persian": "fa",
    "hindi": "hi", "bengali": "bn", "urdu": "ur", "tamil": "ta", "swahili": "sw", "yoruba": "yo",
    "hausa": "ha", "amharic": "am", "chinese": "zh", "japanese": "ja", "korean": "ko", "vietnamese": "vi",
    "indonesian": "id", "malay": "ms", "thai": "th", "latin": "la",
}
_CODE = re.compile(r"[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*")


def language_code(value: str) -> str:
    """``value`` as a language code: a code is kept (lower-cased primary subtag), a known name is
    mapped; anything else raises ValueError naming the accepted forms."""
    text = value.strip()
    if text.lower() in NAMES:
        return NAMES[text.lower()]
    if _CODE.fullmatch(text) and text.split("-")[0].split("_")[0].islower():
        return text
    raise ValueError(f"'{value}' is not a language code (ISO 639, e.g. 'ro', 'ron', 'ro-RO') "
                     "or a language name glotkit knows (e.g. 'Romanian')")
