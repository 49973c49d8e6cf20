"""Scanner DICOM to the raw dataset format: ``sap import-dicom``.

A whole-body MRI exam leaves the scanner as DICOM files of several series, one per station and
contrast, that no network can read as they are: the stations overlap and differ in intensity,
the DWI holds several b-values in one series at a coarser grid than the T1. This stage turns
such an exam into the T1 + b1000 (+ ADC) images on one grid that the rest of the library reads.

Modules, by concern: ``dicom_files`` (finding files, reading headers, b-value tags),
``series`` (T1 / DWI roles, derived frames, slice order, gaps, duplicates, repeated stations),
``stacks`` (pixels of a sorted stack as a SimpleITK image), ``stations`` (the output grid,
composing overlapping stations, intensity standardisation), ``adc``, ``bias`` (N4),
``register`` (DWI to T1), ``output`` (the output folder, atomic per case), ``importer`` (one case
end to end, the manifest, a folder of cases).
"""
