//! YJ code (個別医薬品コード / 薬価基準収載医薬品コード) structure.
//!
//! 12 characters: 薬効分類 (therapeutic class, 4 digits) + 成分 (ingredient, 3
//! digits) + 剤形 (route / dosage form, 1 letter) + 規格 (strength, 1 character)
//! + 銘柄 (brand, 2) + check digit (1). Example `2325003B2029`.
//!
//! 一般名コード (generic-name prescribing code, 一般名処方マスタ) keeps the first 9
//! characters and replaces the brand part with `ZZZ` (`2325003B2ZZZ`); 138 codes
//! put a letter in the 9th position to group strengths (`2339178BAZZZ`).
//!
//! Rule used by the EHR sharing service for brand-unspecified codes: a
//! `...ZZZ` code stands for every product whose YJ code shares its first 9
//! characters (or the first 8 when the 9th is a letter). Duplicate-medication
//! checks compare [`ingredient`] (the first 7 characters).

/// True for a well-formed 12-character YJ code (`\d{7}[A-Z][0-9A-Z]{4}` with a final digit).
pub fn is_yj(code: &str) -> bool {
    let b = code.as_bytes();
    b.len() == 12
        && b[..7].iter().all(u8::is_ascii_digit)
        && b[7].is_ascii_uppercase()
        && b[8..12]
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        && !is_general(code)
}

/// True for a 一般名コード (`\d{7}[A-Z][0-9A-Z]ZZZ`).
pub fn is_general(code: &str) -> bool {
    let b = code.as_bytes();
    b.len() == 12
        && b[..7].iter().all(u8::is_ascii_digit)
        && b[7].is_ascii_uppercase()
        && (b[8].is_ascii_digit() || b[8].is_ascii_uppercase())
        && &code[9..] == "ZZZ"
}

/// The ingredient part (薬効分類 + 成分, 7 digits) of a YJ or 一般名コード.
pub fn ingredient(code: &str) -> Option<&str> {
    if is_yj(code) || is_general(code) {
        Some(&code[..7])
    } else {
        None
    }
}

/// The ingredient + dosage-form part (8 characters).
pub fn ingredient_and_form(code: &str) -> Option<&str> {
    if is_yj(code) || is_general(code) {
        Some(&code[..8])
    } else {
        None
    }
}

/// The brand-unspecified code a YJ code falls under by structure (first 9 + `ZZZ`).
/// The drug master (col. 37) is authoritative where it differs.
pub fn general_code_of(yj: &str) -> Option<String> {
    is_yj(yj).then(|| format!("{}ZZZ", &yj[..9]))
}

/// Does the brand-unspecified `general` code cover product `yj`?
pub fn general_covers(general: &str, yj: &str) -> bool {
    if !is_general(general) || !is_yj(yj) {
        return false;
    }
    if general.as_bytes()[8].is_ascii_digit() {
        general[..9] == yj[..9]
    } else {
        general[..8] == yj[..8]
    }
}

/// Same ingredient (for duplicate-medication checks)?
pub fn same_ingredient(a: &str, b: &str) -> bool {
    matches!((ingredient(a), ingredient(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure() {
        assert!(is_yj("2325003B2029"));
        assert!(!is_yj("2325003B2ZZZ"));
        assert!(is_general("2325003B2ZZZ"));
        assert!(is_general("2339178BAZZZ"));
        assert_eq!(ingredient("2325003B2029"), Some("2325003"));
        assert_eq!(
            general_code_of("2325003B2029").as_deref(),
            Some("2325003B2ZZZ")
        );
        assert!(general_covers("2325003B2ZZZ", "2325003B2029"));
        assert!(general_covers("2339178BAZZZ", "2339178B1040"));
        assert!(!general_covers("2325003B2ZZZ", "2325003B1029"));
        assert!(same_ingredient("2325003B2029", "2325003F1ZZZ"));
        assert_eq!(ingredient("abc"), None);
    }
}
