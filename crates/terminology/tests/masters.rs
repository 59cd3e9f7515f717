//! Import of the reference masters in ../shared and the lookups on them.

use std::path::{Path, PathBuf};

use tsunagi_terminology::{MasterKind, Terminology, import, systems, yj};

fn shared(rel: &str) -> PathBuf {
    let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).join(rel);
    assert!(
        p.exists(),
        "reference data missing: {} (tests read ../shared relative to the repository root)",
        p.display()
    );
    p
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tsunagi-term-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn all_masters() -> &'static Terminology {
    static T: std::sync::OnceLock<Terminology> = std::sync::OnceLock::new();
    T.get_or_init(import_all)
}

fn import_all() -> Terminology {
    let d = tmp("all");
    let files = [
        ("masters/drug-master-y.csv", MasterKind::Drug, 19_686),
        ("masters/disease-master-b.csv", MasterKind::Disease, 27_437),
        ("masters/modifier-master-z.csv", MasterKind::Modifier, 2_375),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-corelabo-cs.json",
            MasterKind::Jlac10,
            437,
        ),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-infectionlabo-cs.json",
            MasterKind::Jlac10,
            255,
        ),
        (
            "codesets/jfagy/JFAGY_J9FN_20250401_R01.csv",
            MasterKind::Jfagy,
            1_738,
        ),
    ];
    for (f, k, rows) in files {
        let r = import(&shared(f), k, &d).unwrap();
        assert!(
            r.errors.is_empty(),
            "{f}: {:?}",
            &r.errors[..r.errors.len().min(5)]
        );
        assert_eq!(r.imported, rows, "{f}");
        assert_eq!(r.encoding, "UTF-8");
    }
    Terminology::open(&d).unwrap()
}

#[test]
fn drug_master_lookups() {
    let t = all_masters();
    let d = t.drug("610406079").expect("ガスター散２％");
    assert_eq!(d.name, "ガスター散２％");
    assert_eq!(d.yj_code, "2325003B2029");
    assert_eq!(d.general_code, "2325003B2ZZZ");
    assert_eq!(d.unit, "ｇ");
    assert_eq!(
        t.general_name("2325003B2ZZZ"),
        Some("【般】ファモチジン散２％")
    );
    // six claims codes share that generic-name code
    assert_eq!(t.drugs_for_general_code("2325003B2ZZZ").len(), 6);
    assert_eq!(Terminology::yj_ingredient("2325003B2029"), Some("2325003"));
    // the intentional error example's code does not exist; the right one does
    let general = systems::GENERAL_NAME[1];
    assert!(
        !t.validate_code(general, "2124030F2ZZZ", None)
            .unwrap()
            .result
    );
    assert!(
        t.validate_code(general, "1124030F2ZZZ", None)
            .unwrap()
            .result
    );
    let l = t.lookup(systems::DRUG_RECEIPT[0], "610406079").unwrap();
    assert_eq!(l.display, "ガスター散２％");
    assert!(
        l.properties
            .iter()
            .any(|(k, v)| k == "yjCode" && v == "2325003B2029")
    );
    // brand-unspecified rule against the master
    for d in t.drugs_for_general_code("2339178BAZZZ") {
        assert!(
            yj::general_covers("2339178BAZZZ", &d.yj_code) || d.yj_code.is_empty(),
            "{d:?}"
        );
    }
}

#[test]
fn disease_master_chain_code_key_icd10() {
    let t = all_masters();
    let d = t.disease("8833421").unwrap();
    assert_eq!(d.name, "高血圧症");
    assert_eq!(t.disease_key_number("8833421"), Some("20061593"));
    assert_eq!(t.icd10("8833421"), Some("I10"));
    assert_eq!(t.icd10("20061593"), Some("I10"));
    assert_eq!(t.disease_by_key("20061593").unwrap().code, "8833421");
    let l = t.lookup(systems::DISEASE_KEY[0], "20061593").unwrap();
    assert_eq!(l.display, "高血圧症");
    assert!(l.properties.iter().any(|(k, v)| k == "icd10" && v == "I10"));
    assert!(t.lookup(systems::DISEASE_EXCHANGE[0], "UHGQ").is_some());
    assert!(
        t.validate_code(systems::DISEASE_KEY[0], "99999999", None)
            .is_some_and(|r| !r.result)
    );
}

#[test]
fn modifier_jlac10_and_jfagy() {
    let t = all_masters();
    assert_eq!(t.modifier("2049").unwrap().name, "左");
    let k = &t.modifier("2049").unwrap().key_number.clone();
    assert!(t.lookup(systems::MODIFIER_KEY[0], k).is_some());
    let lab = t.lab_code("3A015000002329101").unwrap();
    assert_eq!(lab.group, "ALB");
    assert_eq!(lab.item_name, "アルブミン");
    assert!(
        t.validate_code(systems::JLAC10_CORE, "3A015000002329101", None)
            .unwrap()
            .result
    );
    // a core code is not an infection code
    assert!(
        !t.validate_code(systems::JLAC10_INFECTION, "3A015000002329101", None)
            .unwrap()
            .result
    );
    let a = t.lookup(systems::JFAGY_FOOD, "J9FC11310000").unwrap();
    assert_eq!(a.display, "さば");
    assert!(t.lookup(systems::JFAGY_FOOD, "J9FA32540000").is_some());
    let v = t
        .validate_code(systems::JFAGY_FOOD, "J9FC11310000", Some("サバ"))
        .unwrap();
    assert!(
        v.result && v.message.is_some(),
        "display mismatch is reported: {v:?}"
    );
    assert!(
        t.validate_code("http://example.org/unknown", "x", None)
            .is_none()
    );
}

#[test]
fn shift_jis_input_and_bad_lines_are_reported_by_line() {
    let d = tmp("sjis");
    let text = std::fs::read_to_string(shared("masters/disease-master-b.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().take(100).map(|l| format!("{l}\r")).collect();
    lines[9] = "\"0\",\"B\",\"12345\",\"broken\"\r".to_string(); // line 10: wrong column count
    lines[19] = lines[19].replacen("\"B\"", "\"X\"", 1); // line 20: wrong master
    let utf8 = lines.join("\n") + "\n";
    let (sjis, _, unmappable) = encoding_rs::SHIFT_JIS.encode(&utf8);
    assert!(!unmappable);
    let f = d.join("b_test.txt");
    std::fs::write(&f, &sjis).unwrap();
    let r = import(&f, MasterKind::Disease, &d).unwrap();
    assert_eq!(r.encoding, "Shift_JIS");
    assert_eq!(r.imported, 98);
    let bad: Vec<usize> = r.errors.iter().map(|e| e.line).collect();
    assert_eq!(bad, vec![10, 20], "{:?}", r.errors);
    let t = Terminology::open(&d).unwrap();
    let first = text
        .lines()
        .next()
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(t.disease(&first).is_some());
    assert!(
        t.disease(&first)
            .unwrap()
            .name
            .chars()
            .all(|c| c != '\u{fffd}')
    );
}

#[test]
fn missing_master_is_unknown_not_invalid() {
    let d = tmp("empty");
    let t = Terminology::open(&d).unwrap();
    assert!(t.loaded().is_empty());
    assert!(
        t.validate_code(systems::GENERAL_NAME[0], "2124030F2ZZZ", None)
            .is_none()
    );
}

#[test]
fn jlac10_csv_form_is_accepted() {
    let d = tmp("jlaccsv");
    let r = import(
        &shared("codesets/jlac10-labo-items.csv"),
        MasterKind::Jlac10,
        &d,
    )
    .unwrap();
    assert_eq!(r.imported, 692);
    assert!(r.errors.is_empty());
}

#[test]
fn masters_cli_import_exit_codes() {
    use tsunagi_terminology::cli::{MastersArgs, MastersCommand, run_masters};
    let d = tmp("cli");
    let ok = run_masters(MastersArgs {
        command: MastersCommand::Import {
            file: shared("masters/modifier-master-z.csv"),
            kind: MasterKind::Modifier,
            data_dir: d.clone(),
        },
    })
    .unwrap();
    assert_eq!(ok, 0);
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "\"0\",\"Z\",\"12\"\n").unwrap();
    assert!(
        run_masters(MastersArgs {
            command: MastersCommand::Import {
                file: bad,
                kind: MasterKind::Modifier,
                data_dir: d.clone()
            }
        })
        .is_err()
    );
    let found = run_masters(MastersArgs {
        command: MastersCommand::Lookup {
            system: systems::MODIFIER_KEY[0].into(),
            code: Terminology::open(&d)
                .unwrap()
                .modifier("2049")
                .unwrap()
                .key_number
                .clone(),
            data_dir: d,
        },
    })
    .unwrap();
    assert_eq!(found, 0);
}

/// `masters import --kind interactions`: the documented CSV (header, comments,
/// YJ / 一般名コード / 7-digit ingredient codes, Shift_JIS accepted), matched on the
/// ingredient part in either order; bad lines reported by number and skipped.
#[test]
fn interactions_table() {
    let d = tmp("interactions");
    let csv = "code_a,code_b,reason\n\
               # warfarin\n\
               3332001,2171022F1022,作用増強\n\
               2325003F1ZZZ,\"6132013F1020\",\"理由, 引用符つき\"\n\
               3332001,notacode,bad\n\
               1149019F1560,2144001F1027\n";
    let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode(csv);
    let f = d.join("interactions.csv");
    std::fs::write(&f, &sjis).unwrap();
    let r = import(&f, MasterKind::Interactions, &d).unwrap();
    assert_eq!(r.imported, 2);
    assert_eq!(r.encoding, "Shift_JIS");
    let lines: Vec<usize> = r.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [5, 6], "{:?}", r.errors);
    assert!(r.errors[0].message.contains("column 2"), "{:?}", r.errors);
    let t = Terminology::open(&d).unwrap();
    assert!(t.loaded().contains(&MasterKind::Interactions));
    assert_eq!(t.interaction_count(), 2);
    // any brand/generic form of the ingredients, either order
    let x = t.interaction("2171022F1030", "3332001F1028").expect("pair");
    assert_eq!(x.reason, "作用増強");
    assert_eq!(
        t.interaction("6132013F1ZZZ", "2325003B2029")
            .unwrap()
            .reason,
        "理由, 引用符つき"
    );
    assert!(t.interaction("3332001F1028", "2325003B2029").is_none());
}

/// `masters import --kind hot`: MEDIS's HOT code master (24 columns, header line,
/// Shift_JIS as distributed), HOT9 or HOT13 in column 1; lookups by HOT9, HOT13
/// and HOT7 give the YJ code. The two rows are the master's layout with the
/// HOT9 → YJ pair the e-prescription IG's own example carries.
#[test]
fn hot_code_master() {
    let d = tmp("hot");
    let header = "\"基準番号（ＨＯＴコード）\",\"処方用番号（ＨＯＴ７）\",\"会社識別用番号\",\"調剤用番号\",\"物流用番号\",\"ＪＡＮコード\",\"薬価基準収載医薬品コード\",\"個別医薬品コード\",\"レセプト電算処理システムコード（１）\",\"レセプト電算処理システムコード（２）\",\"告示名称\",\"販売名\",\"レセプト電算処理システム医薬品名\",\"規格単位\",\"包装形態\",\"包装単位数\",\"包装単位単位\",\"包装総量数\",\"包装総量単位\",\"区分\",\"製造会社\",\"販売会社\",\"更新区分\",\"更新年月日\"";
    let row = |hot: &str, yj: &str, receipt: &str, name: &str| {
        format!(
            "\"{hot}\",\"{}\",\"{}\",,,,\"{yj}\",\"{yj}\",\"{receipt}\",,\"{name}\",\"{name}\",\"{name}\",\"２５０ｍｇ１錠\",,,,,,\"内\",\"会社\",\"会社\",\"1\",\"20260930\"",
            hot.get(..7).unwrap_or(""),
            hot.get(7..9).unwrap_or("")
        )
    };
    let csv = [
        header.to_string(),
        row(
            "103831601",
            "2233002F1280",
            "",
            "カルボシステイン錠２５０ｍｇ",
        ),
        row("1000000010101", "2325003F1020", "610406079", "別の錠"),
        row("10383160", "2233002F1280", "", "桁不足"),
        row("103831701", "notayjcode", "", "YJなし"),
    ]
    .join("\r\n");
    let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode(&csv);
    let f = d.join("MEDIS20260930.TXT");
    std::fs::write(&f, &sjis).unwrap();
    let r = import(&f, MasterKind::Hot, &d).unwrap();
    assert_eq!(r.imported, 2, "{:?}", r.errors);
    let lines: Vec<usize> = r.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [4, 5], "{:?}", r.errors);
    assert!(r.errors[0].message.contains("column 1"), "{:?}", r.errors);
    assert!(r.errors[1].message.contains("column 8"), "{:?}", r.errors);
    let t = Terminology::open(&d).unwrap();
    assert!(t.loaded().contains(&MasterKind::Hot));
    assert_eq!(t.hot("103831601").unwrap().yj_code, "2233002F1280");
    // a HOT13 carries its HOT9 in the first nine digits; a HOT13 file is keyed by HOT9
    assert_eq!(t.hot("1038316010101").unwrap().yj_code, "2233002F1280");
    assert_eq!(t.hot("100000001").unwrap().receipt_code, "610406079");
    assert_eq!(t.hot7_yj("1038316").unwrap().yj_code, "2233002F1280");
    assert!(t.hot("10383160").is_none() && t.hot("999999999").is_none());
    // $lookup in the HOT9 system
    let l = t
        .lookup("urn:oid:1.2.392.200119.4.403.1", "103831601")
        .expect("lookup");
    assert_eq!(l.display, "カルボシステイン錠２５０ｍｇ");
    assert!(
        t.lookup("urn:oid:1.2.392.200119.4.403.1", "1038316010101")
            .is_none()
    );
}
