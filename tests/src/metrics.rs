//! A small Prometheus / OpenMetrics text parser: enough to find samples by name and
//! label subset.

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether every `(key, value)` in `subset` is one of this sample's labels.
    pub fn matches(&self, subset: &[(&str, &str)]) -> bool {
        subset.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// Parses every sample line; comments, `# EOF` and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let value_str = rest.split_whitespace().next()?;
    let value = match value_str {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

/// Sum of all samples named `name` whose labels include `subset`; `None` if none match.
pub fn sum(samples: &[Sample], name: &str, subset: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in samples.iter().filter(|s| s.name == name && s.matches(subset)) {
        found = true;
        total += s.value;
    }
    found.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums() {
        let text = "# HELP shoal_registry_requests Requests.\n\
# TYPE shoal_registry_requests counter\n\
shoal_registry_requests_total{route=\"blob\",method=\"GET\",status=\"200\"} 3\n\
shoal_registry_requests_total{route=\"blob\",method=\"HEAD\",status=\"200\"} 2\n\
shoal_registry_requests_total{route=\"manifest\",method=\"GET\",status=\"404\"} 1\n\
shoal_cache_bytes 1048576\n\
weird{msg=\"a \\\"q\\\", b\"} 1.5e3 1700000000\n\
# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 5);
        assert_eq!(sum(&s, "shoal_registry_requests_total", &[("route", "blob")]), Some(5.0));
        assert_eq!(
            sum(&s, "shoal_registry_requests_total", &[("route", "blob"), ("method", "GET")]),
            Some(3.0)
        );
        assert_eq!(sum(&s, "shoal_registry_requests_total", &[("route", "base")]), None);
        assert_eq!(sum(&s, "shoal_cache_bytes", &[]), Some(1048576.0));
        assert_eq!(s[4].label("msg"), Some("a \"q\", b"));
        assert_eq!(s[4].value, 1500.0);
    }
}
