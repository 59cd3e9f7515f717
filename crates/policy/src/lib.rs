//! tsunagi-policy: the platform's identity and authorisation core and audit records.
//!
//! - [`identity`]: organisation kinds, roles, purposes of use, [`Principal`].
//! - [`ids`]: Japanese identifier formats (医療機関等コード, 保険者番号, ...) and check digits.
//! - [`token`]: the server's Ed25519 key; issuing and verifying bearer tokens.
//! - [`client`]: SMART Backend Services `private_key_jwt` client-credentials exchange.
//! - [`policy`]: the single policy module deciding every request (deny by default).
//! - [`audit`]: audit records and the group-commit [`AuditSink`].
//!
//! A request through the server:
//!
//! 1. `ServerKeys::verify(bearer, now)` → [`Principal`] (or 401, audited as denied);
//! 2. purpose: the declared one, or `principal.role.default_purpose()`;
//! 3. reads/writes of one resource: load the current version, then
//!    `Policy::decide(&principal, &AccessRequest { patient, author_org, .. })`;
//!    searches: `Policy::search_scope(..)` for the searched type and for every
//!    `_include`/`_revinclude` target type, and run the search under the scope;
//! 4. `AuditSink::record(..)` (one record per patient touched, see
//!    [`AuditRecord::per_patient`]) and only then return the data; a 503 from the
//!    sink fails the request.

pub mod audit;
pub mod client;
pub mod identity;
pub mod ids;
pub mod policy;
pub mod token;

#[cfg(test)]
mod testutil;

pub use audit::{AuditRecord, AuditSink, Outcome};
pub use client::{OAuthError, OrgLookup, ReplayCache, TokenResponse, exchange_client_assertion};
pub use identity::{OrgKind, Principal, Purpose, Role, role_allowed_for};
pub use policy::{AccessRequest, AccessRule, Decision, Denial, Operation, Permit, Policy};
pub use token::ServerKeys;
