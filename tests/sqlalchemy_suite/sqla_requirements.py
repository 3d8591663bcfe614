"""What SQLite supports, for SQLAlchemy's suite: one requirements class for the reference
(``sqlite+pysqlite``, the stdlib sqlite3) and the ``sqlite+ltxvfs`` runs, so that the two have
the same skips. SQLAlchemy's own test/requirements.py (which tunes each requirement per backend)
is not shipped in its wheel, so this one was written here: features SQLite has are opened; a
requirement is left closed where the reference run fails with it (``schemas`` through ATTACH,
constraint-name and check-constraint reflection details, the JSON-as-bytes deserializer)."""

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

_OPEN = (
    "table_ddl_if_exists", "index_ddl_if_exists", "views", "view_column_reflection",
    "view_reflection", "temporary_views", "temp_table_names", "has_temp_table",
    "reflects_pk_names", "intersect", "except_", "window_functions", "ctes",
    "ctes_with_update_delete", "nullsordering", "boolean_col_expressions", "json_type",
    "computed_columns",
    "computed_columns_virtual", "computed_columns_stored", "computed_columns_reflect_persisted",
    "regexp_match", "datetime_historic", "date_historic", "update_from", "tuple_in",
    "autocommit", "isolation_level", "indexes_with_expressions",

    "foreign_key_constraint_option_reflection_ondelete",
    "foreign_key_constraint_option_reflection_onupdate",
    "fk_constraint_option_reflection_ondelete_restrict",
    "fk_constraint_option_reflection_ondelete_noaction",
    "fk_constraint_option_reflection_onupdate_restrict", "server_defaults",
    "expression_server_defaults", "unicode_ddl", "supports_bitwise_or", "supports_bitwise_and",
    "supports_bitwise_not", "supports_bitwise_shift", "temp_table_reflection",
    "deferrable_fks", "on_update_or_deferrable_fks", "reflect_table_options",
)


class Requirements(SuiteRequirements):
    def get_isolation_levels(self, config):
        return {"default": "SERIALIZABLE",
                "supported": ["READ UNCOMMITTED", "SERIALIZABLE", "AUTOCOMMIT"]}


#: Closed here although SuiteRequirements opens them: SQLite refuses the SQL.
_CLOSED = ("schemas", "parens_in_union_contained_select_w_limit_offset",
           "parens_in_union_contained_select_wo_limit_offset")

for _name in _OPEN:
    setattr(Requirements, _name, property(lambda self: exclusions.open()))
for _name in _CLOSED:
    setattr(Requirements, _name, property(lambda self: exclusions.closed()))
