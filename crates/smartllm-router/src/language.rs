//! Language identification good enough for routing rules: the script decides
//! most languages; for Latin script, stop words tell the common ones apart.

const LATIN: [(&str, &[&str]); 15] = [
    (
        "en",
        &[
            "the", "and", "is", "of", "to", "what", "how", "you", "in", "a", "are", "this", "for",
            "with", "write", "please",
        ],
    ),
    (
        "es",
        &[
            "el", "la", "de", "que", "y", "en", "los", "las", "es", "por", "una", "cómo", "qué",
            "para", "con",
        ],
    ),
    (
        "fr",
        &[
            "le", "la", "les", "de", "et", "est", "un", "une", "des", "que", "pour", "dans",
            "vous", "qui", "comment",
        ],
    ),
    (
        "de",
        &[
            "der", "die", "das", "und", "ist", "nicht", "ein", "eine", "ich", "zu", "mit", "wie",
            "was", "den", "für",
        ],
    ),
    (
        "it",
        &[
            "il", "di", "che", "e", "la", "per", "un", "una", "non", "sono", "come", "gli",
            "della", "questo",
        ],
    ),
    (
        "pt",
        &[
            "o", "de", "que", "e", "do", "da", "em", "um", "uma", "para", "não", "com", "os",
            "como", "você",
        ],
    ),
    (
        "nl",
        &[
            "de", "het", "een", "en", "van", "is", "dat", "niet", "ik", "op", "te", "zijn", "met",
            "hoe", "wat",
        ],
    ),
    (
        "pl",
        &[
            "nie", "się", "jest", "że", "jak", "czy", "dla", "który", "która", "są", "oraz",
            "może", "tylko", "jaki", "jaka",
        ],
    ),
    (
        "cs",
        &[
            "je", "se", "že", "jak", "pro", "není", "který", "která", "jsou", "také", "nebo",
            "jaký", "jaká", "bude", "když",
        ],
    ),
    (
        "sv",
        &[
            "och", "att", "det", "som", "är", "på", "av", "för", "med", "inte", "jag", "hur",
            "vad", "den", "har",
        ],
    ),
    (
        "tr",
        &[
            "ve", "bir", "bu", "için", "ile", "çok", "gibi", "olarak", "daha", "hangisi", "nasıl",
            "nedir", "değil", "olan", "ama",
        ],
    ),
    (
        "ro",
        &[
            "și", "în", "care", "este", "să", "din", "pentru", "sunt", "cum", "sau", "mai", "fi",
            "acest", "această", "unde",
        ],
    ),
    (
        "hu",
        &[
            "az", "és", "hogy", "nem", "egy", "meg", "van", "csak", "mint", "melyik", "vagy",
            "ezt", "kell", "milyen", "hogyan",
        ],
    ),
    (
        "vi",
        &[
            "của", "và", "là", "có", "không", "những", "được", "trong", "cho", "một", "các", "này",
            "với", "người", "đã",
        ],
    ),
    (
        "id",
        &[
            "yang",
            "dan",
            "di",
            "ini",
            "itu",
            "dengan",
            "untuk",
            "tidak",
            "dari",
            "dalam",
            "akan",
            "apa",
            "bagaimana",
            "adalah",
            "saya",
        ],
    ),
];

/// ISO 639-1 code of the text's language, or `und` when it cannot tell.
pub fn detect(text: &str) -> &'static str {
    let (
        mut latin,
        mut han,
        mut kana,
        mut hangul,
        mut cyr,
        mut arabic,
        mut deva,
        mut greek,
        mut hebrew,
        mut thai,
    ) = (0u32, 0u32, 0u32, 0u32, 0u32, 0u32, 0u32, 0u32, 0u32, 0u32);
    for c in text.chars().take(2000) {
        match c as u32 {
            0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F => latin += 1,
            0x4E00..=0x9FFF | 0x3400..=0x4DBF => han += 1,
            0x3040..=0x30FF => kana += 1,
            0xAC00..=0xD7AF | 0x1100..=0x11FF => hangul += 1,
            0x0400..=0x04FF => cyr += 1,
            0x0600..=0x06FF => arabic += 1,
            0x0900..=0x097F => deva += 1,
            0x0370..=0x03FF => greek += 1,
            0x0590..=0x05FF => hebrew += 1,
            0x0E00..=0x0E7F => thai += 1,
            _ => {}
        }
    }
    let scripts = [
        (kana, "ja"),
        (hangul, "ko"),
        (han, "zh"),
        (cyr, "ru"),
        (arabic, "ar"),
        (deva, "hi"),
        (greek, "el"),
        (hebrew, "he"),
        (thai, "th"),
    ];
    let (best, code) = scripts
        .iter()
        .copied()
        .max_by_key(|(n, _)| *n)
        .unwrap_or((0, "und"));
    // Kana with Han is Japanese; weigh CJK characters (one is a word) against Latin letters.
    if best * 3 > latin && best > 0 {
        if code == "zh" && kana > 0 {
            return "ja";
        }
        return code;
    }
    if latin == 0 {
        return "und";
    }
    let mut counts = [0u32; LATIN.len()];
    let mut words = 0;
    for w in text
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .take(400)
    {
        words += 1;
        let w = w.to_lowercase();
        for (i, (_, stop)) in LATIN.iter().enumerate() {
            if stop.contains(&w.as_str()) {
                counts[i] += 1;
            }
        }
    }
    // The most stop words; a tie with English is English, other ties go to
    // the later list.
    let n = counts.iter().copied().max().unwrap_or(0);
    let i = if counts[0] == n {
        0
    } else {
        counts.iter().rposition(|c| *c == n).unwrap_or(0)
    };
    if n == 0 {
        // Short or technical text without stop words: most such prompts are English.
        return if words > 0 { "en" } else { "und" };
    }
    LATIN[i].0
}

#[cfg(test)]
mod tests {
    use super::detect;

    #[test]
    fn detects_common_languages() {
        assert_eq!(
            detect("What is the capital of France and how big is it?"),
            "en"
        );
        assert_eq!(
            detect("¿Cuál es la capital de Francia y por qué es famosa?"),
            "es"
        );
        assert_eq!(
            detect("Quelle est la capitale de la France et pourquoi est-elle connue ?"),
            "fr"
        );
        assert_eq!(
            detect("Was ist die Hauptstadt von Deutschland und wie groß ist sie?"),
            "de"
        );
        assert_eq!(detect("法国的首都是哪里？"), "zh");
        assert_eq!(detect("フランスの首都はどこですか？"), "ja");
        assert_eq!(detect("Какая столица Франции?"), "ru");
        assert_eq!(detect("프랑스의 수도는 어디입니까?"), "ko");
        assert_eq!(detect("12345 + 678"), "und");
        assert_eq!(
            detect("Który stan włosa jest typowy dla tej choroby?"),
            "pl"
        );
        assert_eq!(
            detect("Vad betyder det här ordspråket och hur används det?"),
            "sv"
        );
        assert_eq!(detect("Aşağıdakilerden hangisi bir memeli değil?"), "tr");
        assert_eq!(detect("Bằng chứng nào sau đây là của sự tiến hóa?"), "vi");
        assert_eq!(detect("Melyik állítás igaz, és hogy miért?"), "hu");
        // English stop words win a tie.
        assert_eq!(detect("Write a haiku"), "en");
    }
}
