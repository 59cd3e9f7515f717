//! Who is asking: organisation kinds, roles, purposes of use and the [`Principal`]
//! every authorised request carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Organisation code of the pseudo-organisation patients act for. A patient is not
/// employed by anybody; their tokens carry `org = "patient"` and
/// [`OrgKind::Patient`], and `Principal::patient` names their Patient resource.
pub const PATIENT_ORG: &str = "patient";

/// Organisation flag: 救急告示医療機関 (emergency-designated hospital).
pub const FLAG_EMERGENCY_DESIGNATED: &str = "emergency-designated";
/// Organisation flag: 災害拠点病院 (disaster base hospital).
pub const FLAG_DISASTER_BASE: &str = "disaster-base";

/// Error for an unknown kebab-case name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{value}' (expected one of: {expected})")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// Defines a kebab-case string enum with `as_str`, `ALL`, `Display`, `FromStr` and serde.
macro_rules! kebab_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            /// The kebab-case wire form.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(UnknownName {
                        what: $what,
                        value: s.to_string(),
                        expected: [$($s),+].join(", "),
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

kebab_enum! {
    /// Kind of organisation a user or client acts for.
    OrgKind, "organisation kind" {
        /// 病院 (20 beds or more).
        Hospital => "hospital",
        /// 診療所.
        Clinic => "clinic",
        /// 歯科診療所.
        DentalClinic => "dental-clinic",
        /// 薬局.
        Pharmacy => "pharmacy",
        /// 保険者 (health insurer).
        Insurer => "insurer",
        /// 市区町村 (municipality).
        Municipality => "municipality",
        /// 保健所 (public health centre).
        PublicHealthCentre => "public-health-centre",
        ResearchOrganisation => "research-organisation",
        /// The platform operator (支払基金/国保中央会 in the real system).
        Operator => "operator",
        /// 厚生労働省 (Ministry of Health, Labour and Welfare).
        Ministry => "ministry",
        /// The pseudo-organisation of patients acting for themselves ([`PATIENT_ORG`]).
        Patient => "patient",
    }
}

impl OrgKind {
    /// Facilities that provide care and write clinical records.
    pub fn is_care_facility(self) -> bool {
        matches!(
            self,
            OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy
        )
    }
}

kebab_enum! {
    /// Role a user or client acts in.
    Role, "role" {
        Doctor => "doctor",
        Dentist => "dentist",
        Pharmacist => "pharmacist",
        Nurse => "nurse",
        /// 医療事務 (reception / billing clerk).
        Clerk => "clerk",
        InsurerStaff => "insurer-staff",
        MunicipalityStaff => "municipality-staff",
        Patient => "patient",
        Researcher => "researcher",
        /// Reviewer of secondary-use applications.
        Reviewer => "reviewer",
        Operator => "operator",
        Ministry => "ministry",
    }
}

impl Role {
    /// Licensed clinical professionals who write clinical records.
    pub fn is_clinical(self) -> bool {
        matches!(
            self,
            Role::Doctor | Role::Dentist | Role::Pharmacist | Role::Nurse
        )
    }

    /// Purposes of use this role may declare. The first is its default.
    pub fn allowed_purposes(self) -> &'static [Purpose] {
        use Purpose::*;
        match self {
            Role::Doctor | Role::Dentist | Role::Pharmacist | Role::Nurse => {
                &[Treatment, Emergency, Disaster]
            }
            Role::Clerk => &[Treatment],
            Role::InsurerStaff => &[Insurer],
            Role::MunicipalityStaff => &[Operations],
            Role::Patient => &[PatientSelf],
            Role::Researcher | Role::Reviewer => &[Research],
            Role::Operator => &[Operations],
            Role::Ministry => &[Operations, Disaster],
        }
    }

    /// Purpose assumed when a request declares none.
    pub fn default_purpose(self) -> Purpose {
        self.allowed_purposes()[0]
    }
}

kebab_enum! {
    /// Purpose of use declared for a request; recorded in the audit trail.
    Purpose, "purpose" {
        Treatment => "treatment",
        Emergency => "emergency",
        Disaster => "disaster",
        PatientSelf => "patient-self",
        Insurer => "insurer",
        Research => "research",
        Operations => "operations",
    }
}

/// Whether `role` may act for an organisation of `kind`:
///
/// | role | organisation kinds |
/// |---|---|
/// | doctor, nurse | hospital, clinic |
/// | dentist | dental-clinic, hospital |
/// | pharmacist | pharmacy, hospital |
/// | clerk | any care facility |
/// | insurer-staff | insurer |
/// | municipality-staff | municipality, public-health-centre |
/// | researcher | research-organisation |
/// | reviewer | research-organisation, operator |
/// | operator | operator |
/// | ministry | ministry |
/// | patient | the `patient` pseudo-organisation only ([`PATIENT_ORG`]) |
pub fn role_allowed_for(kind: OrgKind, role: Role) -> bool {
    use OrgKind as K;
    match role {
        Role::Doctor | Role::Nurse => matches!(kind, K::Hospital | K::Clinic),
        Role::Dentist => matches!(kind, K::DentalClinic | K::Hospital),
        Role::Pharmacist => matches!(kind, K::Pharmacy | K::Hospital),
        Role::Clerk => kind.is_care_facility(),
        Role::InsurerStaff => kind == K::Insurer,
        Role::MunicipalityStaff => matches!(kind, K::Municipality | K::PublicHealthCentre),
        Role::Researcher => kind == K::ResearchOrganisation,
        Role::Reviewer => matches!(kind, K::ResearchOrganisation | K::Operator),
        Role::Operator => kind == K::Operator,
        Role::Ministry => kind == K::Ministry,
        Role::Patient => kind == K::Patient,
    }
}

/// The authenticated caller of a request, as carried by a verified bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Organisation code (医療機関等コード, 保険者番号, 地方公共団体コード, ...),
    /// or [`PATIENT_ORG`] for patients.
    pub org: String,
    pub org_kind: OrgKind,
    /// Organisation flags such as [`FLAG_EMERGENCY_DESIGNATED`].
    pub org_flags: Vec<String>,
    pub role: Role,
    /// The person acting, when known (a backend client may act for the organisation only).
    pub user: Option<String>,
    /// For role patient: the id of their own Patient resource.
    pub patient: Option<String>,
    /// Whether the user authenticated with a second factor.
    pub second_factor: bool,
    /// `jti` of the token this principal came from.
    pub token_id: String,
}

impl Principal {
    /// Builds a principal for a token to be issued (e.g. by `tsunagi token issue`),
    /// checking that the role fits the organisation kind and that a patient names
    /// their Patient resource. `token_id` is left empty: issuing assigns the `jti`.
    pub fn new(
        org: &str,
        org_kind: OrgKind,
        org_flags: Vec<String>,
        role: Role,
        user: Option<String>,
        patient: Option<String>,
        second_factor: bool,
    ) -> Result<Principal, String> {
        if !role_allowed_for(org_kind, role) {
            return Err(format!(
                "role {role} is not valid for an organisation of kind {org_kind}"
            ));
        }
        if role == Role::Patient && (patient.is_none() || org != PATIENT_ORG) {
            return Err(format!(
                "a patient acts for organisation '{PATIENT_ORG}' and needs a patient id"
            ));
        }
        if role != Role::Patient && patient.is_some() {
            return Err("only role patient carries a patient id".into());
        }
        Ok(Principal {
            org: org.to_string(),
            org_kind,
            org_flags,
            role,
            user,
            patient,
            second_factor,
            token_id: String::new(),
        })
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.org_flags.iter().any(|f| f == flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in OrgKind::ALL {
            assert_eq!(k.as_str().parse::<OrgKind>().unwrap(), *k);
        }
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
        }
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>().unwrap(), *p);
        }
        assert_eq!(Role::ALL.len(), 12);
        assert_eq!("insurer-staff".parse::<Role>(), Ok(Role::InsurerStaff));
        assert_eq!(
            "dental-clinic".parse::<OrgKind>(),
            Ok(OrgKind::DentalClinic)
        );
        let e = "Doctor".parse::<Role>().unwrap_err();
        assert!(e.to_string().contains("unknown role 'Doctor'"), "{e}");
        assert_eq!(
            serde_json::to_value(Role::InsurerStaff).unwrap(),
            "insurer-staff"
        );
        assert!(serde_json::from_value::<Role>(serde_json::json!("admin")).is_err());
    }

    #[test]
    fn roles_per_org_kind() {
        use OrgKind as K;
        let allowed = |r: Role| -> Vec<OrgKind> {
            K::ALL
                .iter()
                .copied()
                .filter(|k| role_allowed_for(*k, r))
                .collect()
        };
        assert_eq!(allowed(Role::Doctor), vec![K::Hospital, K::Clinic]);
        assert_eq!(allowed(Role::Dentist), vec![K::Hospital, K::DentalClinic]);
        assert_eq!(allowed(Role::Pharmacist), vec![K::Hospital, K::Pharmacy]);
        assert_eq!(allowed(Role::Nurse), vec![K::Hospital, K::Clinic]);
        assert_eq!(
            allowed(Role::Clerk),
            vec![K::Hospital, K::Clinic, K::DentalClinic, K::Pharmacy]
        );
        assert_eq!(allowed(Role::InsurerStaff), vec![K::Insurer]);
        assert_eq!(
            allowed(Role::MunicipalityStaff),
            vec![K::Municipality, K::PublicHealthCentre]
        );
        assert_eq!(allowed(Role::Researcher), vec![K::ResearchOrganisation]);
        assert_eq!(
            allowed(Role::Reviewer),
            vec![K::ResearchOrganisation, K::Operator]
        );
        assert_eq!(allowed(Role::Operator), vec![K::Operator]);
        assert_eq!(allowed(Role::Ministry), vec![K::Ministry]);
        assert_eq!(allowed(Role::Patient), vec![K::Patient]);
    }

    #[test]
    fn principal_constructor_checks() {
        let p = Principal::new(
            "1311234567",
            OrgKind::Hospital,
            vec![],
            Role::Doctor,
            None,
            None,
            true,
        )
        .unwrap();
        assert!(p.second_factor && p.token_id.is_empty());
        assert!(
            Principal::new(
                "x",
                OrgKind::Pharmacy,
                vec![],
                Role::Doctor,
                None,
                None,
                false
            )
            .is_err()
        );
        assert!(
            Principal::new(
                PATIENT_ORG,
                OrgKind::Patient,
                vec![],
                Role::Patient,
                None,
                None,
                false
            )
            .is_err()
        );
        assert!(
            Principal::new(
                PATIENT_ORG,
                OrgKind::Patient,
                vec![],
                Role::Patient,
                None,
                Some("p1".into()),
                false
            )
            .is_ok()
        );
        assert!(
            Principal::new(
                "x",
                OrgKind::Hospital,
                vec![],
                Role::Nurse,
                None,
                Some("p1".into()),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn default_purposes() {
        assert_eq!(Role::Doctor.default_purpose(), Purpose::Treatment);
        assert_eq!(Role::Patient.default_purpose(), Purpose::PatientSelf);
        assert_eq!(Role::InsurerStaff.default_purpose(), Purpose::Insurer);
        assert_eq!(Role::Operator.default_purpose(), Purpose::Operations);
        assert_eq!(Role::Researcher.default_purpose(), Purpose::Research);
        assert!(!Role::Clerk.allowed_purposes().contains(&Purpose::Emergency));
    }
}
