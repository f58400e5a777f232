//! A message's string attributes ([`Attributes`]).

/// String attributes of a message: Redis entry fields, AMQP headers, Pub/Sub attributes.
///
/// Empty attributes allocate nothing, so the chaos monkey's own messages carry none for free.
///
/// ```
/// use mayhem::Attributes;
/// let mut attributes = Attributes::new();
/// assert!(attributes.is_empty());
/// attributes.insert("origin", "billing");
/// attributes.insert("origin", "payroll");
/// assert_eq!(attributes.get("origin"), Some("payroll"));
/// assert_eq!(attributes.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes(
    /// A boxed slice, absent when empty: every lease carries its message through the hand-off
    /// channel and the task, so they take two words, not a `Vec`'s three (setting one
    /// reallocates, which only producers do).
    Option<Box<[(String, String)]>>,
);

impl Attributes {
    /// No attributes (allocates nothing).
    pub const fn new() -> Self {
        Attributes(None)
    }

    /// Sets `key` to `value`, replacing an earlier value of the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        if let Some(slot) = self
            .0
            .as_deref_mut()
            .and_then(|pairs| pairs.iter_mut().find(|(k, _)| *k == key))
        {
            slot.1 = value;
            return;
        }
        let mut pairs = self.0.take().map(Vec::from).unwrap_or_default();
        pairs.push((key, value));
        self.0 = Some(pairs.into_boxed_slice());
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every attribute, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// Bytes of every key and value together.
    pub fn byte_len(&self) -> usize {
        self.pairs().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The pairs, empty when there are none.
    fn pairs(&self) -> &[(String, String)] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut attributes = Attributes::new();
        for (key, value) in iter {
            attributes.insert(key, value);
        }
        attributes
    }
}
