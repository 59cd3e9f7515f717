//! Reading `extension` elements of a resource or element held as JSON.

use serde_json::Value;

/// The extensions of `element` with this `url`, in order.
pub fn extensions<'a>(element: &'a Value, url: &'a str) -> impl Iterator<Item = &'a Value> {
    element
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// The first extension of `element` with this `url`.
pub fn extension<'a>(element: &'a Value, url: &str) -> Option<&'a Value> {
    element
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_by_url_in_order() {
        let v = json!({"extension": [
            {"url": "a", "valueString": "1"},
            {"url": "b", "valueString": "2"},
            {"url": "a", "valueString": "3"}
        ]});
        let a: Vec<_> = extensions(&v, "a")
            .map(|e| e["valueString"].clone())
            .collect();
        assert_eq!(a, vec![json!("1"), json!("3")]);
        assert_eq!(extension(&v, "b").unwrap()["valueString"], "2");
        assert!(extension(&v, "c").is_none());
        assert!(extension(&json!({"extension": "x"}), "a").is_none());
        assert_eq!(extensions(&json!({}), "a").count(), 0);
    }
}
