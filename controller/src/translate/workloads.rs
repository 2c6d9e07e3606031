//! (being written)
use super::{TranslateOptions, Translated};
use crate::store::Snapshot;

pub fn translate(_snap: &Snapshot, _opts: &TranslateOptions, _out: &mut Translated) {}
