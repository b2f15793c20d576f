//! The rows of the workflow.

use std::error::Error as StdError;
use std::time::SystemTime;

use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use crate::{LockableRow, Table};

/// Where a project stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectStatus {
    /// Taking proposals.
    Open,
    /// A proposal was accepted.
    Assigned,
}

/// Where a proposal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProposalStatus {
    /// Waiting for a decision.
    Pending,
    /// The project's one accepted proposal.
    Accepted,
    /// Another proposal was accepted.
    Rejected,
    /// The freelancer withdrew it.
    Withdrawn,
}

/// Statuses are stored as text (with a `CHECK` constraint) and converted here, in one place.
macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The value stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }

        impl<'a> FromSql<'a> for $ty {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
                match <&str as FromSql>::from_sql(ty, raw)? {
                    $($text => Ok($ty::$variant),)+
                    other => Err(format!(concat!("unknown ", stringify!($ty), " {:?}"), other).into()),
                }
            }
            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }

        impl ToSql for $ty {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut bytes::BytesMut,
            ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }
            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }
            to_sql_checked!();
        }
    };
}

text_enum!(ProjectStatus { Open => "open", Assigned => "assigned" });
text_enum!(ProposalStatus {
    Pending => "pending",
    Accepted => "accepted",
    Rejected => "rejected",
    Withdrawn => "withdrawn",
});

/// A project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// Its id.
    pub id: i64,
    /// Its title.
    pub title: String,
    /// Open or assigned.
    pub status: ProjectStatus,
    /// When it was posted.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

impl LockableRow for Project {
    type Key = i64;
    const TABLE: Table = Table::new("projects");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Project {
            id: row.try_get("id")?,
            title: row.try_get("title")?,
            status: row.try_get("status")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

/// A proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// Its id.
    pub id: i64,
    /// The project it is for.
    pub project_id: i64,
    /// Who submitted it.
    pub freelancer: String,
    /// Where it stands.
    pub status: ProposalStatus,
    /// When it was submitted.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

impl Proposal {
    pub(super) fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Proposal {
            id: row.try_get("id")?,
            project_id: row.try_get("project_id")?,
            freelancer: row.try_get("freelancer")?,
            status: row.try_get("status")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// A project with all its proposals (oldest first), read from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectDetails {
    /// The project.
    pub project: Project,
    /// Its proposals, by id.
    pub proposals: Vec<Proposal>,
}
