//! tsunagi-policy: the platform's identity and authorisation core and audit records.
//!
//! - [`identity`]: organisation kinds, roles, purposes of use, [`Principal`].
//! - [`ids`]: Japanese identifier formats (医療機関等コード, 保険者番号, ...) and check digits.
//! - [`token`]: the server's Ed25519 key; issuing and verifying bearer tokens.
//! - [`client`]: SMART Backend Services `private_key_jwt` client-credentials exchange.
//! - [`policy`]: the single policy module deciding every request (deny by default).
//! - [`audit`]: audit records and the group-commit [`AuditSink`].

pub mod audit;
pub mod client;
pub mod identity;
pub mod ids;
pub mod policy;
pub mod token;

#[cfg(test)]
mod testutil;

pub use audit::{AuditRecord, AuditSink, Outcome};
pub use client::{OAuthError, ReplayCache, TokenResponse, exchange_client_assertion};
pub use identity::{OrgKind, Principal, Purpose, Role, role_allowed_for};
pub use policy::{AccessRequest, AccessRule, Decision, Denial, Operation, Permit, Policy};
pub use token::ServerKeys;
