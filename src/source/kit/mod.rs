//! The broker kit: what every source needs and writes once, here.
//!
//! - [`LeaseTable`]: the held deliveries, under lease ids a settled slot's later lease
//!   never answers to.

mod leases;

pub(crate) use self::leases::LeaseTable;
