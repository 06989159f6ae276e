//! One file per scenario (docs/BENCHMARKS.md has the commands and the numbers).

pub(crate) mod backend;
pub(crate) mod batch;
pub(crate) mod chaos;
pub(crate) mod churn;
pub(crate) mod connect;
pub(crate) mod echo;
pub(crate) mod fanout;
pub(crate) mod longpoll;
pub(crate) mod rooms;
pub(crate) mod unicast;
pub(crate) mod upgrade;
