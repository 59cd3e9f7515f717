//! FHIR date, dateTime and instant values as inclusive millisecond ranges.
