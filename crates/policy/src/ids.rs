//! Japanese identifier formats and their check digits.
//!
//! Two check-digit rules are used:
//!
//! - **Modulus 10, weights 2-1** (the rule of the 保険者番号設定要領, identical to Luhn):
//!   multiply the digits before the check digit by 2, 1, 2, 1, ... starting from the
//!   rightmost of them; where a product has two digits add its digits; the check
//!   digit is 10 minus the last digit of the sum, or 0 when that last digit is 0.
//!   Example: 33120015 → 3·2,3·1,1·2,2·1,0·2,0·1,1·2 → 6+3+2+2+0+0+2 = 15 → 10−5 = 5.
//! - **Modulus 11, weights 6-5-4-3-2** (地方公共団体コード, JIS X 0402): the five digits are
//!   multiplied by 6, 5, 4, 3, 2 and summed; the check digit is the last digit of
//!   11 minus (sum mod 11), so a remainder of 0 gives 1 and a remainder of 1 gives 0.

/// Why an identifier is malformed. The message is written for the API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must be {expected} digits, got {got} characters")]
    Length {
        what: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("{what} must contain only the digits 0-9")]
    NotDigits { what: &'static str },
    #[error("{what} has prefecture number {got}, expected 01-47")]
    Prefecture { what: &'static str, got: String },
    #[error(
        "{what} has score-table number {got}, expected 1 (medical), 3 (dental) or 4 (pharmacy)"
    )]
    ScoreTable { what: &'static str, got: char },
    #[error("{what} check digit is {got}, expected {expected}")]
    CheckDigit {
        what: &'static str,
        got: u8,
        expected: u8,
    },
}

fn digits(
    what: &'static str,
    s: &str,
    lengths: &[usize],
    expected: &'static str,
) -> Result<Vec<u8>, IdError> {
    if !lengths.contains(&s.chars().count()) {
        return Err(IdError::Length {
            what,
            expected,
            got: s.chars().count(),
        });
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError::NotDigits { what });
    }
    Ok(s.bytes().map(|b| b - b'0').collect())
}

fn check_prefecture(what: &'static str, d: &[u8]) -> Result<(), IdError> {
    let p = d[0] * 10 + d[1];
    if (1..=47).contains(&p) {
        Ok(())
    } else {
        Err(IdError::Prefecture {
            what,
            got: format!("{}{}", d[0], d[1]),
        })
    }
}

/// Check digit by modulus 10 with weights 2-1 from the right (see the module docs).
pub fn mod10_w21_check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let p = u32::from(d) * if i % 2 == 0 { 2 } else { 1 };
            p / 10 + p % 10
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// Check digit by modulus 11 with weights 6-5-4-3-2 (see the module docs).
pub fn mod11_local_government_check_digit(body: &[u8; 5]) -> u8 {
    let sum: u32 = body
        .iter()
        .zip([6u32, 5, 4, 3, 2])
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    ((11 - sum % 11) % 10) as u8
}

fn verify_check(what: &'static str, d: &[u8], expected: u8) -> Result<(), IdError> {
    let got = *d.last().expect("length checked");
    if got == expected {
        Ok(())
    } else {
        Err(IdError::CheckDigit {
            what,
            got,
            expected,
        })
    }
}

/// 医療機関等コード: medical institution / pharmacy code, 10 digits as printed on
/// prescriptions and claims: 2-digit prefecture (01–47), 1-digit score table
/// (点数表番号: 1 medical, 3 dental, 4 pharmacy), then the 7-digit institution code
/// (2-digit district, 4-digit serial, check digit). The check digit is computed by
/// the modulus-10 weights 2-1 rule over the preceding nine digits, prefecture and
/// score table included (e.g. `0110113719`).
pub fn validate_medical_institution_code(s: &str) -> Result<(), IdError> {
    const WHAT: &str = "medical institution code";
    let d = digits(WHAT, s, &[10], "10")?;
    check_prefecture(WHAT, &d)?;
    if !matches!(d[2], 1 | 3 | 4) {
        return Err(IdError::ScoreTable {
            what: WHAT,
            got: char::from(b'0' + d[2]),
        });
    }
    verify_check(WHAT, &d, mod10_w21_check_digit(&d[..9]))
}

/// 保険者番号: insurer number. 8 digits for employee and other health insurance
/// (法別番号 2 + prefecture 2 + insurer 3 + check 1), or 6 digits for National Health
/// Insurance (国民健康保険: prefecture 2 + insurer 3 + check 1). The check digit uses
/// the modulus-10 weights 2-1 rule over the preceding digits.
pub fn validate_insurer_number(s: &str) -> Result<(), IdError> {
    const WHAT: &str = "insurer number";
    let d = digits(WHAT, s, &[6, 8], "8 (or 6 for National Health Insurance)")?;
    let pref = if d.len() == 8 { &d[2..4] } else { &d[0..2] };
    check_prefecture(WHAT, pref)?;
    verify_check(WHAT, &d, mod10_w21_check_digit(&d[..d.len() - 1]))
}

/// 公費負担者番号: public-expense payer number, 8 digits (法別番号 2 + prefecture 2 +
/// implementing body 3 + check 1), modulus-10 weights 2-1 check digit.
pub fn validate_public_payer_number(s: &str) -> Result<(), IdError> {
    const WHAT: &str = "public payer number";
    let d = digits(WHAT, s, &[8], "8")?;
    check_prefecture(WHAT, &d[2..4])?;
    verify_check(WHAT, &d, mod10_w21_check_digit(&d[..7]))
}

/// 受給者番号: public-expense recipient number, 7 digits, the last a modulus-10
/// weights 2-1 check digit over the first six.
pub fn validate_recipient_number(s: &str) -> Result<(), IdError> {
    const WHAT: &str = "recipient number";
    let d = digits(WHAT, s, &[7], "7")?;
    verify_check(WHAT, &d, mod10_w21_check_digit(&d[..6]))
}

/// 地方公共団体コード: local government code, 6 digits: prefecture 2 + municipality 3 +
/// modulus-11 check digit (weights 6-5-4-3-2, see the module docs). Prefectures
/// themselves have municipality part 000 (東京都 = 130001).
pub fn validate_local_government_code(s: &str) -> Result<(), IdError> {
    const WHAT: &str = "local government code";
    let d = digits(WHAT, s, &[6], "6")?;
    check_prefecture(WHAT, &d)?;
    let body: [u8; 5] = d[..5].try_into().expect("length checked");
    verify_check(WHAT, &d, mod11_local_government_check_digit(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every single-digit substitution of a valid number must be rejected.
    fn assert_detects_substitutions(valid: &str, f: fn(&str) -> Result<(), IdError>) {
        for i in 0..valid.len() {
            for c in b'0'..=b'9' {
                let mut b = valid.as_bytes().to_vec();
                if b[i] == c {
                    continue;
                }
                b[i] = c;
                let s = String::from_utf8(b).unwrap();
                assert!(f(&s).is_err(), "{s} (mutated from {valid}) accepted");
            }
        }
    }

    #[test]
    fn insurer_numbers() {
        // Published numbers: 全国健康保険協会 (Japan Health Insurance Association)
        // branches 北海道, 東京, 大阪; 千葉県警察 mutual aid (the worked example of the
        // rule); 東京都後期高齢者医療広域連合.
        for ok in ["01010016", "01130012", "01270016", "33120015", "39131156"] {
            assert_eq!(validate_insurer_number(ok), Ok(()), "{ok}");
            assert_detects_substitutions(ok, validate_insurer_number);
        }
        // National Health Insurance, 6 digits: 千代田区 (13101 → 1), 中央区 (13102 → 9).
        assert_eq!(validate_insurer_number("131011"), Ok(()));
        assert_eq!(validate_insurer_number("131029"), Ok(()));
        // 0613999 gives 9·2→9, 9, 9·2→9, 3, 1·2, 6, 0 = 38 → check 2.
        assert_eq!(validate_insurer_number("06139992"), Ok(()));
        assert_eq!(
            validate_insurer_number("06139993"),
            Err(IdError::CheckDigit {
                what: "insurer number",
                got: 3,
                expected: 2
            })
        );
        assert!(matches!(
            validate_insurer_number("0113001"),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            validate_insurer_number("0113001a"),
            Err(IdError::NotDigits { .. })
        ));
        // prefecture 48 does not exist (check digit made consistent)
        let body = [0, 1, 4, 8, 0, 0, 1];
        let s = format!("0148001{}", mod10_w21_check_digit(&body));
        assert!(matches!(
            validate_insurer_number(&s),
            Err(IdError::Prefecture { .. })
        ));
        // adjacent transposition 01130012 -> 10130012 is caught
        assert!(validate_insurer_number("10130012").is_err());
    }

    #[test]
    fn public_payer_and_recipient_numbers() {
        // 54 (難病) Hokkaido 602 → 7, the published worked example.
        assert_eq!(validate_public_payer_number("54016027"), Ok(()));
        assert_detects_substitutions("54016027", validate_public_payer_number);
        assert!(validate_public_payer_number("5401602").is_err());
        // 受給者番号: 123456 → 6·2→3,5,4·2,3,2·2,1 = 24 → 6.
        assert_eq!(mod10_w21_check_digit(&[1, 2, 3, 4, 5, 6]), 6);
        assert_eq!(validate_recipient_number("1234566"), Ok(()));
        assert_detects_substitutions("1234566", validate_recipient_number);
        assert!(validate_recipient_number("123456").is_err());
    }

    #[test]
    fn medical_institution_codes() {
        // Published example of a 10-digit prescription institution code.
        assert_eq!(validate_medical_institution_code("0110113719"), Ok(()));
        assert_detects_substitutions("0110113719", validate_medical_institution_code);
        // score table 2 does not exist (check digit made consistent)
        let d = [1, 3, 2, 1, 2, 3, 4, 5, 6];
        let s: String = d.iter().map(|x| char::from(b'0' + x)).collect::<String>()
            + &mod10_w21_check_digit(&d).to_string();
        assert_eq!(
            validate_medical_institution_code(&s),
            Err(IdError::ScoreTable {
                what: "medical institution code",
                got: '2'
            })
        );
        assert!(validate_medical_institution_code("011011371").is_err());
    }

    #[test]
    fn local_government_codes() {
        // 千代田区, 札幌市, 大阪市, 横浜市, 東京都, 北海道, 神戸市 (remainder 1 → 0),
        // 苫小牧市 (remainder 0 → 1).
        for ok in ["131016", "011002", "271004", "141003", "010006", "281000"] {
            assert_eq!(validate_local_government_code(ok), Ok(()), "{ok}");
            assert_detects_substitutions(ok, validate_local_government_code);
        }
        assert_eq!(validate_local_government_code("012131"), Ok(()));
        assert_eq!(validate_local_government_code("130001"), Ok(()));
        // Remainders 0 and 10 share check digit 1, so the rule cannot catch a change
        // that moves the sum between them: 01213 (sum 22) and 01218 (sum 32) both get 1.
        // Likewise 東京都 130001 (sum 21, remainder 10) and 330001 (sum 33, remainder 0).
        assert_eq!(validate_local_government_code("012181"), Ok(()));
        assert_eq!(validate_local_government_code("330001"), Ok(()));
        assert_eq!(mod11_local_government_check_digit(&[2, 8, 1, 0, 0]), 0);
        assert_eq!(mod11_local_government_check_digit(&[0, 1, 2, 1, 3]), 1);
        assert!(matches!(
            validate_local_government_code("13101"),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            validate_local_government_code("000000"),
            Err(IdError::Prefecture { .. })
        ));
    }
}
