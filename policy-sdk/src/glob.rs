//! Glob matching for target names, paths, argv words and the like.
//!
//! `*` matches any run of characters except `/`, `**` any run including `/`, and `?`
//! one character except `/`. Everything else matches itself. For names without `/`
//! (targets, agents, tables) `*` and `**` behave the same.

/// True if `text` matches `pattern` in full.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // reachable[j]: the pattern prefix seen so far matches t[..j]. One pass per pattern
    // token keeps the cost at O(|pattern| * |text|) whatever the input.
    let mut reachable = vec![false; t.len() + 1];
    reachable[0] = true;
    let mut i = 0;
    while i < p.len() {
        let mut next = vec![false; t.len() + 1];
        if p[i] == '*' {
            let crosses = p.get(i + 1) == Some(&'*');
            i += if crosses { 2 } else { 1 };
            for j in 0..=t.len() {
                if reachable[j] || (j > 0 && next[j - 1] && (crosses || t[j - 1] != '/')) {
                    next[j] = true;
                }
            }
        } else {
            for j in 1..=t.len() {
                let one = if p[i] == '?' {
                    t[j - 1] != '/'
                } else {
                    t[j - 1] == p[i]
                };
                next[j] = reachable[j - 1] && one;
            }
            i += 1;
        }
        reachable = next;
    }
    reachable[t.len()]
}

/// True if `text` matches any of `patterns`.
pub fn glob_any<S: AsRef<str>>(patterns: &[S], text: &str) -> bool {
    patterns.iter().any(|p| glob(p.as_ref(), text))
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn matches() {
        for (pattern, text, expected) in [
            ("prod-*", "prod-db", true),
            ("prod-*", "staging-db", false),
            ("*", "", true),
            ("?", "", false),
            ("/api/*", "/api/users", true),
            ("/api/*", "/api/users/1", false),
            ("/api/**", "/api/users/1", true),
            ("/api/*/orders", "/api/7/orders", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("ls", "ls", true),
            ("ls", "lsof", false),
            ("**", "any/thing", true),
            ("x?z", "x/z", false),
        ] {
            assert_eq!(glob(pattern, text), expected, "{pattern} vs {text}");
        }
    }

    #[test]
    fn hostile_patterns_stay_cheap() {
        let text = "a".repeat(2000);
        assert!(!glob("*a*a*a*a*a*a*a*a*b", &text));
    }
}
