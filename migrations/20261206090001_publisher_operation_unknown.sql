-- A command whose PATCH/DELETE answer was lost and whose outcome nothing showed within the
-- budget (marketplace-api.md §15.2): neither refused nor succeeded, for an operator.
ALTER TABLE publisher_operations DROP CONSTRAINT publisher_operations_status_check;
ALTER TABLE publisher_operations ADD CONSTRAINT publisher_operations_status_check
    CHECK (status IN ('Requested', 'Accepted', 'Refused', 'Succeeded', 'Failed', 'Conflict',
                      'Unknown'));
