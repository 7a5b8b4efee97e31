//! The request parameters Kiln reads (`timeout`, `priority`, `max_cost_us`,
//! `tenant`, and for text `max_tokens` and `truncate`), type-checked. Front
//! ends turn their own parameter encoding into [`ParamValue`]s; others'
//! parameters (perf_analyzer sends its own) are ignored.

use crate::error::InferError;
use crate::model::tokenize::TokenizeOptions;

/// One parameter value as a front end received it.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int64(i64),
    Uint64(u64),
    Double(f64),
    String(String),
    /// Present with no value.
    Empty,
}

impl ParamValue {
    fn describe(&self) -> &'static str {
        match self {
            Self::Bool(_) => "a bool",
            Self::Int64(_) => "an int64",
            Self::String(_) => "a string",
            Self::Double(_) => "a double",
            Self::Uint64(_) => "a uint64",
            Self::Empty => "no value",
        }
    }
}

/// Kiln's own request parameters, type-checked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestParams {
    pub timeout_us: Option<u64>,
    pub priority: Option<u64>,
    pub max_cost_us: Option<u64>,
    pub tenant: Option<String>,
    /// Text models: the request's own token limit and what to do above it.
    pub text: TokenizeOptions,
}

fn invalid(msg: impl Into<String>) -> InferError {
    InferError::InvalidArgument(msg.into())
}

fn unsigned(name: &str, value: &ParamValue) -> Result<u64, InferError> {
    match value {
        ParamValue::Uint64(v) => Ok(*v),
        ParamValue::Int64(v) if *v >= 0 => Ok(*v as u64),
        ParamValue::Int64(v) => Err(invalid(format!("parameter '{name}': must be >= 0, got {v}"))),
        other => {
            Err(invalid(format!("parameter '{name}': expected an int64 or uint64 value, got {}", other.describe())))
        }
    }
}

impl RequestParams {
    /// Reads and type-checks Kiln's parameters among `parameters`.
    pub fn parse<'a>(parameters: impl IntoIterator<Item = (&'a str, ParamValue)>) -> Result<Self, InferError> {
        let mut out = Self::default();
        for (name, value) in parameters {
            match name {
                "timeout" => out.timeout_us = Some(unsigned(name, &value)?),
                "priority" => out.priority = Some(unsigned(name, &value)?),
                "max_cost_us" => out.max_cost_us = Some(unsigned(name, &value)?),
                "max_tokens" => match unsigned(name, &value)? {
                    0 => return Err(invalid("parameter 'max_tokens': must be at least 1")),
                    n => out.text.max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX)),
                },
                "truncate" => match value {
                    ParamValue::Bool(b) => out.text.truncate = Some(b),
                    other => {
                        return Err(invalid(format!(
                            "parameter 'truncate': expected a bool, got {}",
                            other.describe()
                        )));
                    }
                },
                "tenant" => match value {
                    ParamValue::String(s) => out.tenant = Some(s),
                    other => {
                        return Err(invalid(format!(
                            "parameter 'tenant': expected a string, got {}",
                            other.describe()
                        )));
                    }
                },
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_parameters_are_type_checked_and_others_ignored() {
        let parsed = RequestParams::parse([
            ("timeout", ParamValue::Int64(5)),
            ("tenant", ParamValue::String("a".into())),
            ("truncate", ParamValue::Bool(false)),
            ("triton_enable_empty_final_response", ParamValue::Bool(true)),
        ])
        .expect("valid");
        assert_eq!(
            (parsed.timeout_us, parsed.tenant.as_deref(), parsed.text.truncate),
            (Some(5), Some("a"), Some(false))
        );
        let err = RequestParams::parse([("timeout", ParamValue::String("1s".into()))]).unwrap_err();
        assert!(err.to_string().contains("parameter 'timeout': expected an int64 or uint64 value, got a string"));
        let err = RequestParams::parse([("max_tokens", ParamValue::Uint64(0))]).unwrap_err();
        assert!(err.to_string().contains("at least 1"));
    }
}
